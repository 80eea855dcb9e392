//! Credential detectors over free text: string values of any object, log lines, exec
//! output. The contract the object masker and the stream maskers share.
//!
//! Each detector has an id, a regular expression, and the false-positive controls that
//! gitleaks and trufflehog use: *keywords* (a detector's regex only runs when one of its
//! keywords occurs in the text, found for all detectors at once by one Aho-Corasick scan,
//! so text without keywords costs one pass and no allocation), a minimum *Shannon entropy*
//! of the found value, and an *allowlist* of values that are not credentials (templated
//! references such as `${DB_PASSWORD}`, `null`, the `EXAMPLE` keys of AWS's docs). Found
//! values are replaced by [`marker`]: `**masked:<id>**`. The set and its controls are
//! documented in docs/policy-reference.md, section "Detectors".
//!
//! Matching works on bytes ([`Detectors::redact_bytes`]), so log and exec output that is
//! not UTF-8 is masked without touching its other bytes; [`Detectors::redact`] is the same
//! over `str`.

use std::{
    borrow::Cow,
    collections::HashSet,
    sync::{Arc, Mutex, OnceLock},
};

use aho_corasick::AhoCorasick;
use regex::bytes::{Regex, RegexBuilder};
use serde::Deserialize;

mod builtin;
#[cfg(test)]
pub(crate) mod tests;

pub use builtin::BUILTIN_IDS;
pub(crate) use builtin::PEM_ID;

/// Most detectors (built-in plus extra) one set may hold; candidates are a fixed bitset.
const MAX_DETECTORS: usize = 256;
/// How much of a found value [`Detector::accept`] looks at.
const JUDGED_BYTES: usize = 256;
/// Compiled-size limit for a custom regex (the `regex` crate's default is 10 MiB).
const EXTRA_REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The `detectors:` block of a policy's `masking:` settings, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectorsSpec {
    /// Built-in detectors to turn off, by id (e.g. `[jwt]`).
    #[serde(default)]
    pub disable: Vec<String>,
    /// Additional detectors.
    #[serde(default)]
    pub extra: Vec<ExtraDetector>,
}

/// A custom detector (`detectors.extra[]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtraDetector {
    /// Stable id, shown in the marker: lowercase letters, digits and `-`.
    pub id: String,
    /// The pattern (Rust `regex` syntax). With capture groups, the first group that took
    /// part in a match is what gets masked; without, the whole match.
    pub regex: String,
    /// Words (ASCII case-insensitive) of which one must occur in a text for the regex to
    /// run there; none means the regex runs on every text.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Minimum Shannon entropy (bits per byte) of the masked value.
    #[serde(default)]
    pub min_entropy: Option<f64>,
}

// `compile` rejects a NaN `minEntropy`, the one value that would make this untrue.
impl Eq for ExtraDetector {}

/// Compiled detectors: cheap to share, `Sync`, no per-call allocation when nothing matches.
/// `Default` holds no detectors; [`Detectors::compile`] of a default spec holds the
/// built-in set.
#[derive(Debug, Clone, Default)]
pub struct Detectors {
    inner: Arc<Inner>,
}

impl PartialEq for Detectors {
    /// Detectors are equal when compiled from equal settings (the built-ins are fixed).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) || self.inner.spec == other.inner.spec
    }
}

/// One detector's hits in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hits {
    /// The detector's stable id (`aws-access-key`, `pem-private-key`, ...).
    pub detector: &'static str,
    /// How many values it replaced.
    pub count: u32,
}

/// Adds `n` hits of `detector` to `hits`.
pub fn add_hits(hits: &mut Vec<Hits>, detector: &'static str, n: u32) {
    match hits.iter_mut().find(|h| h.detector == detector) {
        Some(h) => h.count = h.count.saturating_add(n),
        None => hits.push(Hits { detector, count: n }),
    }
}

/// The total count over `hits`.
pub fn total_hits(hits: &[Hits]) -> u64 {
    hits.iter().map(|h| u64::from(h.count)).sum()
}

/// What replaces a value found by detector `id`: `**masked:<id>**`.
pub fn marker(id: &str) -> String {
    format!("**masked:{id}**")
}

/// A further check on a found value, beyond entropy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// None.
    None,
    /// A JWT: its header must decode to a JSON object with `alg`.
    Jwt,
    /// The value of a `key=value` credential: placeholders are not credentials.
    Value,
}

#[derive(Debug)]
pub(crate) struct Detector {
    id: &'static str,
    marker: Vec<u8>,
    regex: Regex,
    /// The regex has capture groups (the first that participated is the value).
    groups: bool,
    has_keywords: bool,
    min_entropy: f64,
    min_len: usize,
    check: Check,
    /// Built-ins skip values containing `EXAMPLE` (the documented example keys).
    builtin: bool,
    /// A byte every match holds: without it in the text, the regex does not run.
    needs: Option<u8>,
}

#[derive(Debug, Default)]
struct Inner {
    detectors: Vec<Detector>,
    /// All keywords of all detectors; pattern i belongs to the detectors in `owners[i]`.
    keywords: Option<AhoCorasick>,
    owners: Vec<Vec<usize>>,
    /// Detectors without keywords: they run on every text.
    always: Vec<usize>,
    /// PEM block boundaries, for the line masker's multi-line state (when enabled).
    pem: Option<Pem>,
    /// What these detectors were compiled from (`None`: no detectors at all): two sets
    /// compiled from equal specs detect alike.
    spec: Option<DetectorsSpec>,
}

/// The start and end lines of a PEM private key block.
#[derive(Debug)]
pub(crate) struct Pem {
    begin: Regex,
    end: Regex,
    marker: Vec<u8>,
}

impl Pem {
    /// Where a BEGIN line's marker starts and ends in `line`.
    pub(crate) fn begin(&self, line: &[u8]) -> Option<(usize, usize)> {
        memchr::memmem::find(line, b"PRIVATE KEY")?;
        self.begin.find(line).map(|m| (m.start(), m.end()))
    }

    /// Where the END marker ends in `line`.
    pub(crate) fn end(&self, line: &[u8]) -> Option<usize> {
        memchr::memmem::find(line, b"PRIVATE KEY")?;
        self.end.find(line).map(|m| m.end())
    }

    /// The marker that replaces a whole block.
    pub(crate) fn marker(&self) -> &[u8] {
        &self.marker
    }
}

/// Interns a detector id: `Hits` carry `&'static str`; each distinct custom id is stored
/// once however often a policy is reloaded.
fn intern(id: &str) -> &'static str {
    static IDS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut ids = IDS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(known) = ids.get(id) {
        return known;
    }
    let leaked: &'static str = Box::leak(id.to_owned().into_boxed_str());
    ids.insert(leaked);
    leaked
}

/// Shannon entropy of `bytes` in bits per byte (0 for an empty slice).
pub fn shannon_entropy(bytes: &[u8]) -> f64 {
    if bytes.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

impl Detector {
    /// Whether a found value is a credential by this detector's controls.
    fn accept(&self, value: &[u8]) -> bool {
        if value.len() < self.min_len {
            return false;
        }
        // What a value looks like (an example, a placeholder, random enough) is judged by its
        // first bytes, as far as the patterns once reached: text further on cannot make a
        // long credential pass for an example and be shown.
        // (A JWT's structure is checked whole.)
        let head = &value[..value.len().min(JUDGED_BYTES)];
        if memchr::memmem::find(head, b"**masked").is_some()
            || (self.builtin && memchr::memmem::find(head, b"EXAMPLE").is_some())
        {
            return false;
        }
        // Too plain, or a placeholder, only if the start and the whole value both say so.
        if self.min_entropy > 0.0
            && shannon_entropy(head) < self.min_entropy
            && shannon_entropy(value) < self.min_entropy
        {
            return false;
        }
        match self.check {
            Check::None => true,
            Check::Jwt => builtin::is_jwt(value),
            Check::Value => !(builtin::is_placeholder(head) && builtin::is_placeholder(value)),
        }
    }

    /// Adds this detector's accepted values in `text` to `found` as (start, end, index).
    fn find(&self, index: usize, text: &[u8], found: &mut Vec<(usize, usize, usize)>) {
        if self
            .needs
            .is_some_and(|b| memchr::memchr(b, text).is_none())
        {
            return;
        }
        if self.groups {
            for caps in self.regex.captures_iter(text) {
                let value = caps.iter().skip(1).flatten().next().or_else(|| caps.get(0));
                if let Some(m) = value
                    && m.start() < m.end()
                    && self.accept(m.as_bytes())
                {
                    found.push((m.start(), m.end(), index));
                }
            }
        } else {
            for m in self.regex.find_iter(text) {
                if m.start() < m.end() && self.accept(m.as_bytes()) {
                    found.push((m.start(), m.end(), index));
                }
            }
        }
    }
}

/// A detector as the compiler takes it, built-in or custom.
pub(crate) struct DetectorDef<'a> {
    pub(crate) id: &'static str,
    pub(crate) regex: &'a str,
    pub(crate) keywords: Vec<String>,
    pub(crate) min_entropy: f64,
    pub(crate) min_len: usize,
    pub(crate) check: Check,
    pub(crate) builtin: bool,
    /// A byte every match of `regex` holds (a cheap test before the regex runs).
    pub(crate) needs: Option<u8>,
}

/// A set of candidate detectors (indexes below [`MAX_DETECTORS`]).
#[derive(Default)]
struct Candidates([u64; MAX_DETECTORS / 64]);

impl Candidates {
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
}

impl Detectors {
    /// Compiles a spec; the error names what is wrong (the caller adds file:line).
    pub fn compile(spec: &DetectorsSpec) -> Result<Detectors, String> {
        for id in &spec.disable {
            if !BUILTIN_IDS.contains(&id.as_str()) {
                return Err(format!(
                    "detectors.disable: unknown detector {id:?} (built-in detectors: {})",
                    BUILTIN_IDS.join(", ")
                ));
            }
        }
        let mut defs: Vec<DetectorDef<'_>> = builtin::definitions()
            .into_iter()
            .filter(|d| !spec.disable.iter().any(|x| x == d.id))
            .collect();
        let mut seen: HashSet<&str> = HashSet::new();
        for (i, extra) in spec.extra.iter().enumerate() {
            let at = format!("detectors.extra[{i}]");
            let id = extra.id.as_str();
            let valid_id = !id.is_empty()
                && id.len() <= 63
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !id.starts_with('-');
            if !valid_id {
                return Err(format!(
                    "{at}.id: {id:?} is not a detector id (1 to 63 lowercase letters, digits and '-', not starting with '-')"
                ));
            }
            if BUILTIN_IDS.contains(&id) {
                return Err(format!(
                    "{at}.id: {id:?} is a built-in detector; pick another id (or disable the built-in)"
                ));
            }
            if !seen.insert(id) {
                return Err(format!("{at}.id: {id:?} is used twice"));
            }
            if let Some(k) = extra.keywords.iter().find(|k| k.trim().is_empty()) {
                return Err(format!("{at}.keywords: empty keyword {k:?}"));
            }
            let min_entropy = match extra.min_entropy {
                None => 0.0,
                Some(e) if (0.0..=8.0).contains(&e) => e,
                Some(e) => {
                    return Err(format!(
                        "{at}.minEntropy: {e} is outside 0 to 8 (bits per byte)"
                    ));
                }
            };
            defs.push(DetectorDef {
                id: intern(id),
                regex: &extra.regex,
                keywords: extra.keywords.clone(),
                min_entropy,
                min_len: 1,
                check: Check::None,
                builtin: false,
                needs: None,
            });
        }
        if defs.len() > MAX_DETECTORS {
            return Err(format!(
                "detectors: {} detectors, at most {MAX_DETECTORS} are supported",
                defs.len()
            ));
        }
        Self::build(defs, spec)
    }

    fn build(defs: Vec<DetectorDef<'_>>, spec: &DetectorsSpec) -> Result<Detectors, String> {
        let mut detectors = Vec::with_capacity(defs.len());
        let mut keyword_index: Vec<(String, Vec<usize>)> = Vec::new();
        let mut always = Vec::new();
        for (index, def) in defs.into_iter().enumerate() {
            let extra_at = spec
                .extra
                .iter()
                .position(|e| e.id == def.id)
                .map(|i| format!("detectors.extra[{i}].regex"));
            let mut builder = RegexBuilder::new(def.regex);
            if !def.builtin {
                builder.size_limit(EXTRA_REGEX_SIZE_LIMIT);
            }
            let regex = builder.build().map_err(|e| match &extra_at {
                Some(at) => format!("{at} (detector {:?}): {e}", def.id),
                None => format!("built-in detector {}: {e}", def.id),
            })?;
            if regex.is_match(b"") {
                return Err(format!(
                    "{} (detector {:?}): the pattern matches the empty string, so it would mask everywhere",
                    extra_at.as_deref().unwrap_or("detectors"),
                    def.id
                ));
            }
            for k in &def.keywords {
                let k = k.trim().to_ascii_lowercase();
                match keyword_index.iter_mut().find(|(w, _)| *w == k) {
                    Some((_, owners)) => owners.push(index),
                    None => keyword_index.push((k, vec![index])),
                }
            }
            if def.keywords.is_empty() {
                always.push(index);
            }
            detectors.push(Detector {
                id: def.id,
                marker: marker(def.id).into_bytes(),
                groups: regex.captures_len() > 1,
                regex,
                has_keywords: !def.keywords.is_empty(),
                min_entropy: def.min_entropy,
                min_len: def.min_len,
                check: def.check,
                builtin: def.builtin,
                needs: def.needs,
            });
        }
        let keywords = if keyword_index.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .ascii_case_insensitive(true)
                    .build(keyword_index.iter().map(|(w, _)| w.as_bytes()))
                    .map_err(|e| format!("detectors: keywords: {e}"))?,
            )
        };
        let pem = detectors
            .iter()
            .any(|d| d.id == builtin::PEM_ID)
            .then(builtin::pem)
            .transpose()?;
        Ok(Detectors {
            inner: Arc::new(Inner {
                detectors,
                keywords,
                owners: keyword_index.into_iter().map(|(_, o)| o).collect(),
                always,
                pem,
                spec: Some(spec.clone()),
            }),
        })
    }

    /// The ids of the enabled detectors.
    pub fn ids(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.inner.detectors.iter().map(|d| d.id)
    }

    /// Whether no detector is enabled.
    pub fn is_empty(&self) -> bool {
        self.inner.detectors.is_empty()
    }

    /// The PEM block boundaries when the `pem-private-key` detector is enabled.
    pub(crate) fn pem(&self) -> Option<&Pem> {
        self.inner.pem.as_ref()
    }

    /// `text` with every detected credential replaced, and what was replaced; borrows the
    /// input unchanged when nothing was found (the common case costs no allocation).
    pub fn redact<'t>(&self, text: &'t str, hits: &mut Vec<Hits>) -> Cow<'t, str> {
        match self.redact_bytes(text.as_bytes(), hits) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Matches start and end at ASCII bytes or whole UTF-8 sequences (the patterns
            // are Unicode-aware), and markers are ASCII, so this is valid UTF-8.
            Cow::Owned(bytes) => Cow::Owned(
                String::from_utf8(bytes)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            ),
        }
    }

    /// [`Detectors::redact`] over bytes (which need not be UTF-8): bytes outside the
    /// replaced values are copied unchanged.
    pub fn redact_bytes<'t>(&self, text: &'t [u8], hits: &mut Vec<Hits>) -> Cow<'t, [u8]> {
        let found = self.find(text);
        if found.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut out = Vec::with_capacity(text.len() + 32);
        let mut pos = 0;
        for (start, end, index) in found {
            let d = &self.inner.detectors[index];
            out.extend_from_slice(&text[pos..start]);
            out.extend_from_slice(&d.marker);
            add_hits(hits, d.id, 1);
            pos = end;
        }
        out.extend_from_slice(&text[pos..]);
        Cow::Owned(out)
    }

    /// The values to replace in `text`: sorted, overlapping ones merged (attributed to the
    /// first), as (start, end, detector index).
    fn find(&self, text: &[u8]) -> Vec<(usize, usize, usize)> {
        let inner = &*self.inner;
        let mut candidates = Candidates::default();
        for &i in &inner.always {
            candidates.insert(i);
        }
        // Most texts hold no keyword at all: one plain scan answers that for half the cost
        // of the overlapping scan that finds every keyword (which runs only when it says yes).
        if let Some(ac) = inner.keywords.as_ref().filter(|ac| ac.is_match(text)) {
            let with_keywords = inner.detectors.iter().filter(|d| d.has_keywords).count();
            let mut flagged = 0;
            match ac.try_find_overlapping_iter(text) {
                Ok(matches) => {
                    for m in matches {
                        for &i in &inner.owners[m.pattern().as_usize()] {
                            if !candidates.contains(i) {
                                candidates.insert(i);
                                flagged += 1;
                            }
                        }
                        if flagged == with_keywords {
                            break;
                        }
                    }
                }
                // Cannot happen (the automaton is built for overlapping search); if it did,
                // running every detector is the safe answer.
                Err(_) => {
                    for i in 0..inner.detectors.len() {
                        candidates.insert(i);
                    }
                }
            }
        }
        if candidates.is_empty() {
            return Vec::new();
        }
        let mut found = Vec::new();
        for (i, d) in inner.detectors.iter().enumerate() {
            if candidates.contains(i) {
                d.find(i, text, &mut found);
            }
        }
        if found.len() > 1 {
            // Stable: at equal spans the detector listed first names the marker.
            found.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let mut merged: Vec<(usize, usize, usize)> = Vec::with_capacity(found.len());
            for f in found {
                match merged.last_mut() {
                    Some(last) if f.0 < last.1 => last.1 = last.1.max(f.1),
                    _ => merged.push(f),
                }
            }
            found = merged;
        }
        found
    }
}
