//! The compiled form: rules indexed by resource, namespace and caller namespace, so a
//! request visits only the rules that could match it.

use super::*;

/// Verb bits; `OTHER` stands for every verb not in the known lists, which only `*` covers.
pub(super) mod verb_bits {
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
pub(super) fn request_verb_bit(verb: Verb) -> u32 {
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
        // The approvals API's verbs never reach the policy; `*` covers them like any other.
        Verb::Unknown | Verb::Approve | Verb::Deny => OTHER,
    }
}

/// The bit of a verb named in a policy file (RBAC verbs include `impersonate`).
pub(super) fn verb_bit(verb: &str) -> u32 {
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
pub(super) enum IdSet {
    Any,
    Of(Box<[u32]>),
}

impl IdSet {
    pub(super) fn contains(&self, id: Option<u32>) -> bool {
        match self {
            IdSet::Any => true,
            IdSet::Of(ids) => id.is_some_and(|id| ids.contains(&id)),
        }
    }
}

/// Namespace condition of a resource rule.
#[derive(Debug)]
pub(super) enum NamespaceSet {
    Any,
    AnyNamespaced,
    Of(Box<[u32]>),
}

/// FxHash (rustc's hasher): a multiply-rotate per word, several times faster than SipHash
/// on short keys. Flooding is not a concern here: every table is filled from the policy,
/// and a request only looks keys up, so it cannot build long collision chains.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct FxHasher(pub(super) u64);

impl FxHasher {
    pub(super) fn add(&mut self, word: u64) {
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

pub(super) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// A candidate rule: its index and verb bits, so most non-matching rules are skipped
/// without touching the rule itself.
pub(super) type Entry = (u32, u32);

/// Most lists one request can visit: five resource keys, four lists each.
pub(super) const MAX_LISTS: usize = 20;

/// `Candidates::by_workload` key part for "any request namespace".
pub(super) const ANY_NS: u32 = u32::MAX;

/// Candidate rules for one resource key, ascending, split by the request's namespace and
/// by the calling workload's namespace: a request visits only the rules of its own
/// namespace and caller and those that apply to any.
#[derive(Debug, Default)]
pub(super) struct Candidates {
    pub(super) any_namespace: Vec<Entry>,
    pub(super) by_namespace: FastMap<u32, Vec<Entry>>,
    /// Rules that only match callers in one workload namespace, keyed by (request
    /// namespace id or [`ANY_NS`], workload namespace id): per-team rules of the same
    /// request shape do not all become candidates of every request.
    pub(super) by_workload: FastMap<(u32, u32), Vec<Entry>>,
}

impl Candidates {
    pub(super) fn push(
        &mut self,
        entry: Entry,
        namespaces: &NamespaceSet,
        callers: Option<&[u32]>,
    ) {
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
    pub(super) fn collect<'a>(
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
pub(super) fn push_once(list: &mut Vec<Entry>, entry: Entry) {
    if list.last().is_none_or(|last| last.0 != entry.0) {
        list.push(entry);
    }
}

/// Candidate rules whose resource entries start with one resource part.
#[derive(Debug, Default)]
pub(super) struct ResourceIndex {
    /// `res`: no subresource.
    pub(super) plain: Candidates,
    /// `res/sub`.
    pub(super) subs: FastMap<Box<str>, Candidates>,
    /// `res/*`.
    pub(super) any_sub: Candidates,
}

#[derive(Debug, Default)]
pub(super) struct Interner {
    pub(super) ids: FastMap<Box<str>, u32>,
}

impl Interner {
    pub(super) fn intern(&mut self, s: &str) -> u32 {
        let next = self.ids.len() as u32;
        *self.ids.entry(s.into()).or_insert(next)
    }

    pub(super) fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
}

#[derive(Debug, Default)]
pub(super) struct Compiled {
    pub(super) source: String,
    /// SHA-256 of the text, hex.
    pub(super) digest: String,
    /// When it was compiled.
    pub(super) loaded_at: Option<jiff::Timestamp>,
    pub(super) default: Action,
    pub(super) rules: Vec<Rule>,
    /// Resource rules keyed by the resource part of their entries.
    pub(super) by_resource: FastMap<Box<str>, ResourceIndex>,
    /// Entries `*/sub` and `*/*`.
    pub(super) star: ResourceIndex,
    /// Entries `*`.
    pub(super) any_resource: Candidates,
    /// Non-resource rules by exact URL.
    pub(super) url_exact: FastMap<Box<str>, Vec<u32>>,
    /// Non-resource rules by URL prefix (`""` for `*`), in rule order.
    pub(super) url_prefix: Vec<(Box<str>, u32)>,
    pub(super) groups: Interner,
    pub(super) namespaces: Interner,
    pub(super) names: Interner,
    /// Workload namespaces, service account names, pod names and principal subjects named
    /// by `workloads` and `principals` (one table: equal strings get equal ids).
    pub(super) idents: Interner,
    /// Whether any resource rule is in a `Candidates::by_workload` list.
    pub(super) caller_indexed: bool,
    /// Whether any rule's `when` reads `object` or `oldObject`.
    pub(super) reads_content: bool,
    pub(super) guards: Guards,
    /// `mask` rules' compiled masking.
    pub(super) masking: PolicyMasking,
}

/// Walks the union of ascending candidate lists in ascending order (so the first match in
/// policy order wins) and returns the first rule with the verb that `matches` accepts.
pub(super) fn first_in_merged<'r>(
    lists: &mut [&[Entry]],
    verb: u32,
    rules: &'r [Rule],
    mut matches: impl FnMut(u32, &Rule) -> bool,
) -> Option<&'r Rule> {
    if let [only] = lists {
        return only
            .iter()
            .filter(|(_, verbs)| verbs & verb != 0)
            .filter_map(|(index, _)| Some((*index, rules.get(*index as usize)?)))
            .find(|(index, rule)| matches(*index, rule))
            .map(|(_, rule)| rule);
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
            && matches(next, rule)
        {
            return Some(rule);
        }
    }
}
