//! Matching a request against the compiled rules: first match in policy order wins.

use super::*;

#[derive(Debug)]
pub(super) struct Rule {
    pub(super) name: Arc<str>,
    pub(super) action: Action,
    pub(super) message: Option<Arc<str>>,
    pub(super) verbs: u32,
    pub(super) groups: IdSet,
    pub(super) namespaces: NamespaceSet,
    pub(super) names: IdSet,
    /// Boxed so rules without identity conditions stay small and skip it with one branch.
    pub(super) identity: Option<Box<IdentityCond>>,
    /// `when` and `exec`, checked last: boxed like `identity`.
    pub(super) content: Option<Box<ContentCond>>,
    /// For `action: approve`: who approves and how (shared with every decision).
    pub(super) approval: Option<Arc<Approval>>,
}

/// A rule's CEL conditions and exec selector.
#[derive(Debug)]
pub(super) struct ContentCond {
    pub(super) when: Box<[Condition]>,
    pub(super) exec: Option<ExecCond>,
}

/// Why the walk over the rules stopped at a rule without deciding it.
#[derive(Debug)]
pub(super) enum Stop {
    /// The rule's conditions read content that is not fetched yet.
    Needs { object: bool, old_object: bool },
    /// A condition could not be evaluated: the request is denied with this reason.
    Failed(String),
}

/// Per-request state of the content checks: CEL variables built once, and why the walk
/// stopped, if it did.
pub(super) struct ContentState<'c> {
    vars: Variables<'c>,
    /// The exec request's command lines, built on first use.
    lines: Option<Option<CommandLines>>,
    /// The `mask` rules matched on the way to the deciding rule.
    pub(super) masks: MaskHits,
    pub(super) stop: Option<Stop>,
}

impl<'c> ContentState<'c> {
    pub(super) fn new(ctx: &'c RequestContext<'c>) -> Self {
        ContentState {
            vars: Variables::new(ctx),
            lines: None,
            masks: MaskHits::default(),
            stop: None,
        }
    }
}

/// Whether a rule's `exec` and `when` conditions hold. Returns `true` also when the walk
/// must stop at this rule ([`ContentState::stop`] says why), so that no later rule is
/// taken for the first match.
pub(super) fn content_matches(
    rule: &Rule,
    ctx: &RequestContext<'_>,
    state: &mut ContentState<'_>,
) -> bool {
    let Some(cond) = &rule.content else {
        return true;
    };
    if let Some(exec) = &cond.exec
        && !exec.matches(ctx.exec, &mut state.lines)
    {
        return false;
    }
    let pending = |c: &Content<'_>| matches!(c, Content::Pending);
    for condition in &cond.when {
        let object = condition.reads_object && pending(&ctx.object);
        let old_object = condition.reads_old_object && pending(&ctx.old_object);
        if object || old_object {
            state.stop = Some(Stop::Needs { object, old_object });
            return true;
        }
        let unavailable = |reads: bool, c: &Content<'_>| match c {
            Content::Unavailable(why) if reads => Some(why.to_string()),
            _ => None,
        };
        if let Some(why) = unavailable(condition.reads_object, &ctx.object)
            .or_else(|| unavailable(condition.reads_old_object, &ctx.old_object))
        {
            state.stop = Some(Stop::Failed(format!(
                "condition `{}` reads content that is not available: {why}",
                condition.source
            )));
            return true;
        }
        match condition.eval(&mut state.vars) {
            Ok(true) => {}
            Ok(false) => return false,
            Err(why) => {
                state.stop = Some(Stop::Failed(why));
                return true;
            }
        }
    }
    true
}

/// A rule's `workloads` and `principals`, checked after its request conditions: they are
/// not part of the index, so first-match order is unaffected.
#[derive(Debug, Default)]
pub(super) struct IdentityCond {
    pub(super) workload: Option<WorkloadSel>,
    pub(super) principal: Option<PrincipalSel>,
}

#[derive(Debug)]
pub(super) enum WorkloadSel {
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
pub(super) type ServiceAccountSel = (u32, Option<u32>);

#[derive(Debug)]
pub(super) struct PrincipalSel {
    /// [`kind_bit`]s.
    pub(super) kinds: u8,
    pub(super) subjects: Option<Patterns>,
    pub(super) groups: Option<Box<[Box<str>]>>,
}

/// Exact values (interned) and prefixes (entries ending in `*`).
#[derive(Debug)]
pub(super) struct Patterns {
    pub(super) exact: Box<[u32]>,
    pub(super) prefixes: Box<[Box<str>]>,
}

impl Patterns {
    pub(super) fn matches(&self, id: Option<u32>, value: Option<&str>) -> bool {
        id.is_some_and(|id| self.exact.contains(&id))
            || value.is_some_and(|v| self.prefixes.iter().any(|p| v.starts_with(&**p)))
    }
}

/// Principal kinds as `kinds:` spells them, with their bits.
pub(super) const PRINCIPAL_KINDS: &[(&str, PrincipalKind)] = &[
    ("anonymous", PrincipalKind::Anonymous),
    ("oidc", PrincipalKind::Oidc),
    ("serviceAccount", PrincipalKind::ServiceAccount),
    ("user", PrincipalKind::User),
    ("invalid", PrincipalKind::Invalid),
];

pub(super) fn kind_bit(kind: PrincipalKind) -> u8 {
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
pub(super) struct CallerIds {
    pub(super) namespace: Option<u32>,
    pub(super) service_account: Option<u32>,
    pub(super) pod: Option<u32>,
    pub(super) subject: Option<u32>,
}

/// The policy-level identity guards, with their decision names allocated once.
#[derive(Debug, Default)]
pub(super) struct Guards {
    pub(super) invalid_tokens: Option<Arc<str>>,
    pub(super) service_account_mismatch: Option<Arc<str>>,
}

impl Guards {
    pub(super) fn check(&self, principal: Option<&Principal>) -> Option<Decision> {
        let principal = principal?;
        let deny = |rule: &Arc<str>, message: String| Decision {
            action: Action::Deny,
            rule: Some(rule.clone()),
            message: Some(Arc::from(message)),
            masking: None,
            stdin_lines: None,
            approval: None,
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

impl Compiled {
    pub(super) fn empty(source: &str) -> Self {
        Compiled {
            source: source.to_owned(),
            default: Action::Allow,
            ..Compiled::default()
        }
    }

    pub(super) fn caller_ids(&self, ctx: &RequestContext<'_>) -> CallerIds {
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
    pub(super) fn identity_matches(
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

    pub(super) fn first_resource_match<'c>(
        &self,
        ctx: &'c RequestContext<'c>,
        state: &mut ContentState<'c>,
    ) -> Option<&Rule> {
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
        let matches = |index: u32, rule: &Rule| {
            if let IdSet::Of(_) = rule.groups
                && !rule
                    .groups
                    .contains(*group.get_or_insert_with(|| self.groups.get(&req.api_group)))
            {
                return false;
            }
            // A mask rule also matches a request wider than its scope: a list or watch
            // across all namespaces, or one without a name, can return the objects it
            // names, which must not come back unmasked. (Allow and deny keep RBAC's
            // reading: a rule for namespace `prod` is not a rule for the whole cluster.)
            // Only a collection read or delete spans namespaces; a request on a cluster-scoped
            // resource also has no namespace, and its list (of nodes, say) is widened too:
            // without discovery the two look alike.
            let widen = rule.action == Action::Mask;
            let across = widen
                && req.namespace.is_empty()
                && req.name.is_empty()
                && matches!(req.verb, Verb::List | Verb::Watch | Verb::DeleteCollection);
            let ns_ok = match &rule.namespaces {
                NamespaceSet::Any => true,
                NamespaceSet::AnyNamespaced => across || !req.namespace.is_empty(),
                NamespaceSet::Of(ids) => across || ns.is_some_and(|id| ids.contains(&id)),
            };
            if !ns_ok {
                return false;
            }
            let names_ok = match rule.names {
                IdSet::Any => true,
                IdSet::Of(_) if req.name.is_empty() => widen,
                IdSet::Of(_) => rule
                    .names
                    .contains(*name.get_or_insert_with(|| self.names.get(&req.name))),
            };
            let matched = names_ok
                && self.identity_matches(rule, ctx, &mut ids)
                && content_matches(rule, ctx, state);
            // A matching mask rule adds its masking; the walk goes on to the deciding rule
            // (unless its conditions stopped the walk: then the caller handles the stop).
            if matched && rule.action == Action::Mask && state.stop.is_none() {
                state.masks.push(index);
                return false;
            }
            matched
        };
        first_in_merged(&mut lists[..len], verb, &self.rules, matches)
    }

    pub(super) fn first_url_match<'c>(
        &self,
        ctx: &'c RequestContext<'c>,
        state: &mut ContentState<'c>,
    ) -> Option<&Rule> {
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
            if rule.verbs & verb != 0
                && self.identity_matches(rule, ctx, &mut ids)
                && content_matches(rule, ctx, state)
            {
                if rule.action == Action::Mask && state.stop.is_none() {
                    state.masks.push(next);
                    continue;
                }
                return Some(rule);
            }
        }
    }
}
