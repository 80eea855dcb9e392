//! Content conditions: a rule's `when:` list of CEL expressions, compiled once at load and
//! evaluated per request with the variable names of a Kubernetes
//! ValidatingAdmissionPolicy (`object`, `oldObject`, `request`) plus `workload`,
//! `principal` and `podSpec` (the pod template of any workload kind).
//!
//! The `cel` crate has no runtime cost budget (the API server caps each call), so the
//! gateway bounds evaluation itself, before running anything:
//!
//! * at load, an expression is at most [`MAX_EXPRESSION_BYTES`] long, nests brackets at
//!   most [`MAX_NESTING`] deep (the parser recurses), and nests comprehensions (`all`,
//!   `exists`, `exists_one`, `map`, `filter`) at most [`MAX_COMPREHENSION_DEPTH`] deep;
//!   its cost is compiled into a polynomial in `n`: every node costs 1, and the body of a
//!   comprehension costs `n` times its own cost;
//! * per request, `n` is the number of JSON values in the objects the expression reads,
//!   which bounds the length of every list it can iterate (a list built by `map` or
//!   `filter` is no longer than the one it came from), and the estimated cost must stay
//!   under [`COST_LIMIT`], the per-call limit of the API server. No CEL function is more
//!   than linear in its input (`matches` uses the `regex` crate, which is linear), so the
//!   estimate bounds the work. Over the limit, the condition is not run and the request
//!   is denied with the reason (fail closed), like any other runtime error.

use std::sync::{Arc, LazyLock};

use cel::{Context, Env, IdedExpr, Program, Value as CelValue, common::ast::Expr};
use serde_json::Value;

use super::RequestContext;

/// Longest expression a `when:` entry may hold.
pub const MAX_EXPRESSION_BYTES: usize = 4096;
/// Deepest bracket nesting of an expression.
pub const MAX_NESTING: usize = 32;
/// Deepest nesting of comprehensions (macro expansions) in one expression.
pub const MAX_COMPREHENSION_DEPTH: usize = 3;
/// Largest estimated cost of one evaluation (see the module docs).
pub const COST_LIMIT: f64 = 1_000_000.0;

/// A cost polynomial in `n`: `cost[k]` is the coefficient of `n^k`.
type Cost = [f64; MAX_COMPREHENSION_DEPTH + 1];

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// One compiled `when:` expression.
pub(super) struct Condition {
    /// The expression as written, for errors.
    pub(super) source: Box<str>,
    program: Program,
    /// The cost estimate's polynomial.
    cost: Cost,
    /// Bits (indexes into [`VARIABLES`]) of the variables it reads.
    uses: u8,
    /// Which content variables it reads.
    pub(super) reads_object: bool,
    pub(super) reads_old_object: bool,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

/// The variables every condition may read (anything else is a load error).
const VARIABLES: &[&str] = &[
    "object",
    "oldObject",
    "podSpec",
    "request",
    "workload",
    "principal",
];
/// CEL's type identifiers (`type(x) == string`).
const TYPE_NAMES: &[&str] = &[
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
];

impl Condition {
    /// Compiles one expression; the error says what is wrong (the caller adds file:line).
    pub(super) fn compile(source: &str) -> Result<Condition, String> {
        if source.trim().is_empty() {
            return Err("empty CEL expression".to_owned());
        }
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(format!(
                "CEL expression is {} bytes long; at most {MAX_EXPRESSION_BYTES} are allowed",
                source.len()
            ));
        }
        let mut depth = 0usize;
        for c in source.chars() {
            match c {
                '(' | '[' | '{' => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(format!(
                            "CEL expression nests brackets more than {MAX_NESTING} deep"
                        ));
                    }
                }
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        let program = ENV
            .compile(source)
            .map_err(|e| format!("invalid CEL expression: {}", one_line(&e.to_string())))?;
        let mut stats = Stats::default();
        let walked = stats.walk(program.expression(), 0, 0, None);
        // Amortized costs left at the top belong to no loop: paid once.
        let cost = add(walked.per, walked.amortized);
        if stats.too_deep {
            return Err(format!(
                "CEL expression nests more than {MAX_NESTING} levels deep"
            ));
        }
        if stats.max_comprehension_depth > MAX_COMPREHENSION_DEPTH {
            return Err(format!(
                "CEL expression nests comprehensions (all, exists, exists_one, map, filter) {} deep; at most {MAX_COMPREHENSION_DEPTH} are allowed, so that its cost stays bounded",
                stats.max_comprehension_depth
            ));
        }
        let refs = program.references();
        if let Some(unknown) = stats.idents.iter().find(|v| {
            !VARIABLES.contains(&v.as_str())
                && !TYPE_NAMES.contains(&v.as_str())
                && !stats.bound.contains(v)
        }) {
            return Err(format!(
                "unknown variable '{unknown}'; conditions may read {}",
                VARIABLES.join(", ")
            ));
        }
        Ok(Condition {
            source: source.into(),
            cost,
            uses: VARIABLES
                .iter()
                .enumerate()
                .filter(|(_, v)| refs.has_variable(v))
                .fold(0, |bits, (i, _)| bits | 1 << i),
            reads_object: refs.has_variable("object") || refs.has_variable("podSpec"),
            reads_old_object: refs.has_variable("oldObject"),
            program,
        })
    }

    /// Runs the condition against `vars`: `Ok(true)` when it holds, `Err(why)` when it cannot
    /// be evaluated (an error, a non-boolean result, or over the cost limit).
    pub(super) fn eval(&self, vars: &mut Variables<'_>) -> Result<bool, String> {
        let n = vars.size(self.reads_object, self.reads_old_object) as f64;
        let cost: f64 = self
            .cost
            .iter()
            .enumerate()
            .map(|(k, c)| c * n.powi(k as i32))
            .sum();
        if cost > COST_LIMIT {
            return Err(format!(
                "condition `{}` was not evaluated: its estimated cost {cost:.0} over an input of {n} values exceeds the limit {COST_LIMIT:.0}",
                self.source
            ));
        }
        let ctx = vars.context(self.uses)?;
        match self.program.execute(ctx) {
            Ok(CelValue::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "condition `{}` returned {:?}, not a boolean",
                self.source,
                other.type_of()
            )),
            Err(e) => Err(format!("condition `{}` failed: {e}", self.source)),
        }
    }
}

/// Collapses a multi-line parser message into one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What [`Condition::compile`] learns from walking the AST.
#[derive(Default)]
struct Stats {
    max_comprehension_depth: usize,
    idents: Vec<String>,
    /// Names comprehensions bind (their iteration and accumulator variables).
    bound: Vec<String>,
    too_deep: bool,
}

fn add(a: Cost, b: Cost) -> Cost {
    let mut out = a;
    for (o, b) in out.iter_mut().zip(b) {
        *o += b;
    }
    out
}

/// `n × cost`: the top coefficient is dropped only past the depth limit, which is an error.
fn times_n(c: Cost) -> Cost {
    let mut out = [0.0; MAX_COMPREHENSION_DEPTH + 1];
    out[1..].copy_from_slice(&c[..MAX_COMPREHENSION_DEPTH]);
    out
}

const ONE: Cost = {
    let mut c = [0.0; MAX_COMPREHENSION_DEPTH + 1];
    c[0] = 1.0;
    c
};

/// The cost of a subtree: `per` is paid every time it is evaluated; `amortized` is paid
/// once per iteration *series* of the nearest enclosing comprehension (an inner loop over
/// a part of that comprehension's element: the parts of different elements are disjoint,
/// so all the inner loops together visit at most `n` values).
#[derive(Clone, Copy)]
struct Walked {
    per: Cost,
    amortized: Cost,
}

/// The nearest enclosing comprehension, for amortization.
#[derive(Clone, Copy)]
struct Enclosing<'e> {
    /// Its iteration variable.
    var: &'e str,
    /// Whether it iterates over a list taken from the input (a path from a variable), so
    /// that its elements are disjoint parts of the input.
    disjoint: bool,
}

/// The variable a pure field path (`a.b.c`) starts from.
fn path_root(e: &IdedExpr) -> Option<&str> {
    match &e.expr {
        Expr::Ident(name) => Some(name),
        Expr::Select(s) if !s.test => path_root(&s.operand),
        _ => None,
    }
}

impl Stats {
    /// Walks `e` at syntax depth `depth` inside `loops` comprehensions; returns its cost.
    fn walk<'e>(
        &mut self,
        e: &'e IdedExpr,
        depth: usize,
        loops: usize,
        enclosing: Option<Enclosing<'e>>,
    ) -> Walked {
        let mut out = Walked {
            per: ONE,
            amortized: [0.0; MAX_COMPREHENSION_DEPTH + 1],
        };
        if depth > 4 * MAX_NESTING {
            self.too_deep = true;
            return out;
        }
        let next = depth + 1;
        let mut child = |s: &mut Self, e: &'e IdedExpr| {
            let w = s.walk(e, next, loops, enclosing);
            out.per = add(out.per, w.per);
            out.amortized = add(out.amortized, w.amortized);
        };
        match &e.expr {
            Expr::Unspecified | Expr::Literal(_) => {}
            Expr::Ident(name) => {
                if !self.idents.contains(name) {
                    self.idents.push(name.clone());
                }
            }
            Expr::Call(call) => {
                if let Some(t) = &call.target {
                    child(self, t);
                }
                for a in &call.args {
                    child(self, a);
                }
            }
            Expr::Comprehension(c) => {
                let inner = loops + 1;
                self.max_comprehension_depth = self.max_comprehension_depth.max(inner);
                self.bound.push(c.iter_var.clone());
                self.bound.push(c.accu_var.clone());
                self.bound.extend(c.iter_var2.clone());
                for part in [&c.iter_range, &c.accu_init, &c.result] {
                    child(self, part);
                }
                let root = path_root(&c.iter_range);
                let from_input = root.is_some_and(|r| VARIABLES.contains(&r));
                // A loop over a part of the enclosing loop's element.
                let amortize = enclosing.is_some_and(|en| en.disjoint && root == Some(en.var));
                let me = Enclosing {
                    var: &c.iter_var,
                    disjoint: from_input || amortize,
                };
                let mut body = Walked {
                    per: [0.0; MAX_COMPREHENSION_DEPTH + 1],
                    amortized: [0.0; MAX_COMPREHENSION_DEPTH + 1],
                };
                for part in [&c.loop_cond, &c.loop_step] {
                    let w = self.walk(part, next, inner, Some(me));
                    body.per = add(body.per, w.per);
                    body.amortized = add(body.amortized, w.amortized);
                }
                // Every iteration pays the body; the inner loops over parts of the
                // elements are paid once for all iterations.
                let loop_cost = add(times_n(body.per), body.amortized);
                if amortize {
                    out.amortized = add(out.amortized, loop_cost);
                } else {
                    out.per = add(out.per, loop_cost);
                }
            }
            Expr::List(l) => {
                for el in &l.elements {
                    child(self, el);
                }
            }
            Expr::Map(m) => {
                for entry in &m.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(me) = &entry.expr {
                        child(self, &me.key);
                        child(self, &me.value);
                    }
                }
            }
            Expr::Select(s) => child(self, &s.operand),
            Expr::Struct(s) => {
                for entry in &s.entries {
                    if let cel::common::ast::EntryExpr::StructField(f) = &entry.expr {
                        child(self, &f.value);
                    }
                }
            }
        }
        out
    }
}

/// A request's content, as far as it is known when the policy is asked.
#[derive(Debug, Clone, Copy, Default)]
pub enum Content<'a> {
    /// The request has no such object: `object` of a get or delete, `oldObject` of a create
    /// (CEL sees `null`).
    #[default]
    Absent,
    /// The object, as JSON.
    Known(&'a Value),
    /// Not fetched yet: the caller fetches it (a dry run of a patch, the stored object of an
    /// update) when [`super::evaluate`] asks for it, and asks again.
    Pending,
    /// It cannot be known (body too large or undecodable): conditions that read it deny.
    Unavailable(&'a str),
}

/// The variables of one request, converted to CEL values on first use and shared by every
/// condition evaluated for it.
pub(super) struct Variables<'c> {
    ctx: &'c RequestContext<'c>,
    built: Option<Context<'static, 'static>>,
    /// Bits (indexes into [`VARIABLES`]) of the variables already in `built`.
    added: u8,
    size: Option<(usize, usize)>,
}

impl<'c> Variables<'c> {
    pub(super) fn new(ctx: &'c RequestContext<'c>) -> Self {
        Variables {
            ctx,
            built: None,
            added: 0,
            size: None,
        }
    }

    /// Values in the content the condition reads, plus the request's own variables.
    fn size(&mut self, object: bool, old: bool) -> usize {
        let (o, p) = *self.size.get_or_insert_with(|| {
            let measure = |c: &Content<'_>| match c {
                Content::Known(v) => json_size(v),
                _ => 1,
            };
            (measure(&self.ctx.object), measure(&self.ctx.old_object))
        });
        // The request and identity variables are small: groups and labels.
        16 + if object { o } else { 0 } + if old { p } else { 0 }
    }

    /// The CEL context with (at least) the variables `uses` names, each converted once per
    /// request and only when a condition reads it: converting an object is most of the
    /// cost of a condition.
    fn context(&mut self, uses: u8) -> Result<&Context<'static, 'static>, String> {
        let c = self
            .built
            .get_or_insert_with(|| Context::with_env(ENV.clone()));
        let missing = uses & !self.added;
        for (bit, name) in VARIABLES.iter().enumerate() {
            if missing & (1 << bit) == 0 {
                continue;
            }
            let value = match *name {
                "object" => content_value(&self.ctx.object)?,
                "oldObject" => content_value(&self.ctx.old_object)?,
                "podSpec" => pod_spec_value(
                    &self.ctx.object,
                    kind_of(
                        &self.ctx.request.api_group,
                        &self.ctx.request.resource,
                        &self.ctx.request.subresource,
                    ),
                )?,
                "request" => request_value(self.ctx),
                "workload" => workload_value(self.ctx),
                _ => principal_value(self.ctx),
            };
            c.add_variable_from_value(*name, value);
        }
        self.added |= uses;
        Ok(c)
    }
}

/// Values in a JSON document (map keys included), iteratively: no recursion on hostile
/// depth.
fn json_size(v: &Value) -> usize {
    let mut n = 0usize;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        n += 1;
        match v {
            Value::Array(a) => stack.extend(a.iter()),
            Value::Object(m) => {
                n += m.len();
                stack.extend(m.values());
            }
            _ => {}
        }
    }
    n
}

/// The CEL value of a content variable. Content that is pending or unavailable is `null`
/// here: a condition that reads it never runs (see `content_matches`), but one that does
/// not read it must still be able to run.
fn content_value(c: &Content<'_>) -> Result<CelValue, String> {
    match c {
        Content::Known(v) => Ok(json_to_cel(v)),
        Content::Absent | Content::Pending | Content::Unavailable(_) => Ok(CelValue::Null),
    }
}

/// The kind of object a request's body is for the API server, when the request's URL says
/// so: a create or update on a workload resource (or its `status` or
/// `ephemeralcontainers`, whose bodies are the whole object). The API server reads a
/// body without `kind` as the resource's kind, and refuses a body of another kind, so the
/// URL, not the body, says where the pods are.
pub fn kind_of(api_group: &str, resource: &str, subresource: &str) -> Option<&'static str> {
    if !matches!(subresource, "" | "status" | "ephemeralcontainers") {
        return None;
    }
    Some(match (api_group, resource) {
        ("", "pods") => "Pod",
        ("", "podtemplates") => "PodTemplate",
        ("", "replicationcontrollers") => "ReplicationController",
        ("apps", "deployments") => "Deployment",
        ("apps", "replicasets") => "ReplicaSet",
        ("apps", "statefulsets") => "StatefulSet",
        ("apps", "daemonsets") => "DaemonSet",
        ("batch", "jobs") => "Job",
        ("batch", "cronjobs") => "CronJob",
        _ => return None,
    })
}

/// The pod template's `spec` of a workload object, whatever its kind: `podSpec` saves
/// every rule from spelling out where each kind keeps its pods. `kind` is the object's
/// kind as the request's URL makes it ([`kind_of`]), else the body's own `kind`.
pub fn pod_spec<'a>(object: &'a Value, kind: Option<&str>) -> Option<&'a Value> {
    let kind = match kind {
        Some(kind) => kind,
        None => object.get("kind")?.as_str()?,
    };
    let path: &[&str] = match kind {
        "Pod" => &["spec"],
        "PodTemplate" => &["template", "spec"],
        "Deployment"
        | "ReplicaSet"
        | "StatefulSet"
        | "DaemonSet"
        | "Job"
        | "ReplicationController" => &["spec", "template", "spec"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template", "spec"],
        _ => return None,
    };
    path.iter().try_fold(object, |v, key| v.get(key))
}

fn pod_spec_value(c: &Content<'_>, kind: Option<&str>) -> Result<CelValue, String> {
    match c {
        Content::Known(v) => match pod_spec(v, kind) {
            Some(spec) => Ok(json_to_cel(spec)),
            None => Ok(CelValue::Null),
        },
        other => content_value(other),
    }
}

fn request_value(ctx: &RequestContext<'_>) -> CelValue {
    let r = ctx.request;
    let user = ctx.principal;
    serde_value(serde_json::json!({
        "verb": r.verb.as_str(),
        "operation": operation(r.verb),
        "resource": {"group": r.api_group, "version": r.api_version, "resource": r.resource},
        "subResource": r.subresource,
        "namespace": r.namespace,
        "name": r.name,
        "path": r.path,
        "dryRun": ctx.dry_run,
        "userInfo": {
            "username": user.and_then(|p| p.subject.clone()).unwrap_or_default(),
            "groups": user.map(|p| p.groups.clone()).unwrap_or_default(),
        },
    }))
}

/// The admission operation of a verb, as `request.operation` spells it.
fn operation(verb: crate::request::Verb) -> &'static str {
    use crate::request::Verb;
    match verb {
        Verb::Create | Verb::Post => "CREATE",
        Verb::Update | Verb::Patch | Verb::Put => "UPDATE",
        Verb::Delete | Verb::DeleteCollection => "DELETE",
        _ => "",
    }
}

fn workload_value(ctx: &RequestContext<'_>) -> CelValue {
    let w = ctx.workload.filter(|w| w.is_known());
    serde_value(serde_json::json!({
        "known": w.is_some(),
        "namespace": w.and_then(|w| w.namespace.clone()).unwrap_or_default(),
        "name": w.and_then(|w| w.pod.clone()).unwrap_or_default(),
        "serviceAccount": w.and_then(|w| w.service_account.clone()).unwrap_or_default(),
        "labels": w.map(|w| w.labels.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect::<serde_json::Map<_, _>>()).unwrap_or_default(),
    }))
}

fn principal_value(ctx: &RequestContext<'_>) -> CelValue {
    let p = ctx.principal;
    serde_value(serde_json::json!({
        "kind": p.map_or("anonymous", |p| p.kind.as_str()),
        "username": p.and_then(|p| p.subject.clone()).unwrap_or_default(),
        "groups": p.map(|p| p.groups.clone()).unwrap_or_default(),
    }))
}

fn serde_value(v: Value) -> CelValue {
    json_to_cel(&v)
}

/// A JSON value as a CEL value, directly (no serde round trip). Recursion is bounded by
/// the parsers that built `v` (serde_json stops at 128 levels).
fn json_to_cel(v: &Value) -> CelValue {
    match v {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => CelValue::Int(i),
            (None, Some(u)) => CelValue::UInt(u),
            _ => CelValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(a) => CelValue::List(Arc::new(a.iter().map(json_to_cel).collect())),
        Value::Object(m) => CelValue::Map(cel::objects::Map {
            map: Arc::new(
                m.iter()
                    .map(|(k, v)| {
                        (
                            cel::objects::Key::String(Arc::new(k.clone())),
                            json_to_cel(v),
                        )
                    })
                    .collect(),
            ),
        }),
    }
}
