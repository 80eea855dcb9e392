//! Validation and compilation: the document as written becomes the indexed [`Compiled`]
//! form, or an error that names the YAML path of what is wrong.

use super::*;

/// One step of a YAML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(&'static str),
    /// A key chosen by the author (a label key).
    Field(Box<str>),
    Index(usize),
}

/// A semantic error before it is located in the text.
#[derive(Debug)]
pub(super) struct InvalidAt {
    pub(super) path: Vec<Seg>,
    pub(super) message: String,
}

pub(super) fn invalid(path: Vec<Seg>, message: impl Into<String>) -> InvalidAt {
    InvalidAt {
        path,
        message: message.into(),
    }
}

pub(super) fn render_path(path: &[Seg]) -> String {
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

pub(super) fn compile(raw: RawPolicy, source: &str) -> Result<Compiled, InvalidAt> {
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
    if raw.default == Action::Approve {
        return Err(invalid(
            vec![Seg::Key("default")],
            "default is allow or deny; approval is asked for by rules with action: approve and an approval block",
        ));
    }
    if raw.default == Action::Mask {
        return Err(invalid(
            vec![Seg::Key("default")],
            "default is allow or deny; to mask everything allowed, start the rules with one that has action: mask, verbs: [\"*\"] and resources: [\"*\"]",
        ));
    }
    let (mask_top, mask_limits) = PolicyMasking::top(raw.masking.as_ref())?;
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
        if rule.name.starts_with(approve::BUILTIN_PREFIX) {
            return Err(invalid(
                at(&[Seg::Key("name")]),
                format!(
                    "rule name '{}' starts with '{}', which is reserved for built-in rules",
                    rule.name,
                    approve::BUILTIN_PREFIX
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
        compiled.approval = super::approve::compile(&rule, &at)?;
        compiled.content = compile_content(&rule, &at)?;
        out.reads_content |= compiled
            .content
            .as_ref()
            .is_some_and(|c| c.when.iter().any(|w| w.reads_object || w.reads_old_object));
        out.masking
            .add_rule(&mask_top, mask_limits, &rule, index, &at)?;
        out.rules.push(compiled);
    }
    Ok(out)
}

pub(super) fn compile_verbs(
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
pub(super) fn caller_namespaces(identity: Option<&IdentityCond>) -> Option<Vec<u32>> {
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

/// The verbs that read objects, and the writes that answer with one: a mask rule that
/// masks reads masks those answers as well.
const MASK_READS: u32 = verb_bits::GET | verb_bits::LIST | verb_bits::WATCH;
const MASK_WRITES: u32 = verb_bits::CREATE
    | verb_bits::UPDATE
    | verb_bits::PATCH
    | verb_bits::DELETE
    | verb_bits::DELETECOLLECTION;

/// Subresources whose reads and writes answer with the whole object of their resource.
const MASK_SUBRESOURCES: &[&str] = &["status", "ephemeralcontainers", "resize"];

pub(super) fn compile_resource_rule(
    rule: &RawRule,
    resources: &[String],
    index: u32,
    callers: Option<&[u32]>,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
    out: &mut Compiled,
) -> Result<Rule, InvalidAt> {
    let mut verbs = compile_verbs(&rule.verbs, RESOURCE_VERBS, "resource", at)?;
    if rule.action == Action::Mask && verbs & MASK_READS != 0 {
        // An object comes back from a get, a list or a watch alike, and from a write,
        // which answers with the object it wrote (a dry run writes nothing): masking what
        // the agent reads covers every answer that carries the objects.
        verbs |= MASK_READS | MASK_WRITES;
    }

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
    // A mask rule also covers requests wider than its namespaces (a list or watch across
    // all of them), which may return its namespaces' objects: it is indexed as a rule of
    // any namespace, and `first_resource_match` checks the namespace.
    let index_namespaces = match (&namespaces, rule.action) {
        (NamespaceSet::Of(_), Action::Mask) => &NamespaceSet::Any,
        (namespaces, _) => namespaces,
    };
    if rule.action == Action::Mask {
        // These subresources answer with the whole object (a pod's env values in
        // `pods/status`): a mask rule on a resource masks them too.
        let whole: Vec<(&str, Option<&str>)> = parsed
            .iter()
            .filter(|(_, sub)| sub.is_none())
            .flat_map(|(res, _)| MASK_SUBRESOURCES.iter().map(|sub| (*res, Some(*sub))))
            .collect();
        parsed.extend(whole);
        parsed.sort_unstable();
        parsed.dedup();
    }
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
        candidates.push(entry, index_namespaces, callers);
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
        content: None,
        approval: None,
    })
}

pub(super) fn compile_url_rule(
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
        if url.strip_suffix('*').unwrap_or(url).contains('*') {
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
        content: None,
        approval: None,
    })
}

/// Validates and compiles a rule's `workloads` and `principals`.
pub(super) fn compile_identity(
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
pub(super) fn check_list<'l>(
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

pub(super) fn compile_patterns(list: &[String], idents: &mut Interner) -> Patterns {
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

pub(super) fn compile_workloads(
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

pub(super) fn compile_principals(
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

pub(super) fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
}

/// Splits a `resources` entry into resource and optional subresource, checking its form.
pub(super) fn parse_resource(entry: &str) -> Result<(&str, Option<&str>), String> {
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

pub(super) fn check_group(group: &str) -> Result<(), String> {
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

pub(super) fn check_namespace(ns: &str) -> Result<(), String> {
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
pub(super) fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(is_name_char)
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

pub(super) fn check_service_account(entry: &str) -> Result<(), String> {
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

pub(super) fn check_pod_pattern(pod: &str) -> Result<(), String> {
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
pub(super) fn check_pattern(value: &str, what: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if value.strip_suffix('*').unwrap_or(value).contains('*') {
        return Err(format!(
            "{what} '{value}' may only have '*' at the end (a prefix match)"
        ));
    }
    Ok(())
}

/// Label name part or value: alphanumeric at both ends, `-_.` inside, at most 63 chars.
pub(super) fn is_label_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

pub(super) fn check_label_key(key: &str) -> Result<(), String> {
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

pub(super) fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_token(value) {
        Ok(())
    } else {
        Err(format!(
            "malformed label value '{value}'; label values are at most 63 letters, digits, '-', '_' or '.'"
        ))
    }
}

pub(super) fn check_resource_name(name: &str) -> Result<(), String> {
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

/// Compiles a rule's `when` and `exec` conditions.
pub(super) fn compile_content(
    rule: &RawRule,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
) -> Result<Option<Box<ContentCond>>, InvalidAt> {
    let when = match &rule.when {
        None => Box::default(),
        Some(list) if list.is_empty() => {
            return Err(invalid(
                at(&[Seg::Key("when")]),
                "lists no condition; omit the key instead",
            ));
        }
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(j, source)| {
                Condition::compile(source)
                    .map_err(|m| invalid(at(&[Seg::Key("when"), Seg::Index(j)]), m))
            })
            .collect::<Result<Box<[Condition]>, _>>()?,
    };
    let exec = match &rule.exec {
        None => None,
        Some(raw) => {
            let is_exec = rule.resources.as_deref().is_some_and(|resources| {
                !resources.is_empty()
                    && resources.iter().all(|r| {
                        matches!(
                            r.as_str(),
                            "pods/exec"
                                | "pods/attach"
                                | "pods/*"
                                | "*/exec"
                                | "*/attach"
                                | "*/*"
                                | "*"
                        )
                    })
            });
            if !is_exec {
                return Err(invalid(
                    at(&[Seg::Key("exec")]),
                    "an exec selector applies to resources pods/exec and pods/attach only; list those in 'resources'",
                ));
            }
            if raw.stdin_lines.is_some() && rule.action == Action::Deny {
                return Err(invalid(
                    at(&[Seg::Key("exec"), Seg::Key("stdinLines")]),
                    "stdin line rules apply to sessions a rule allows (action: allow or mask), not to a deny rule",
                ));
            }
            Some(ExecCond::compile(raw, &rule.name).map_err(|e| {
                let mut path = vec![Seg::Key("exec"), Seg::Key(e.key)];
                if let Some(sub) = e.sub {
                    path.push(Seg::Key(sub));
                }
                if let Some(i) = e.index {
                    path.push(Seg::Index(i));
                }
                invalid(at(&path), e.message)
            })?)
        }
    };
    if when.is_empty() && exec.is_none() {
        return Ok(None);
    }
    Ok(Some(Box::new(ContentCond { when, exec })))
}
