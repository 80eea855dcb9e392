//! Credential detectors over free text: string values of any object, log lines, exec
//! output. The contract the object masker and the stream maskers share; the detector set
//! itself is filled in by the detectors work (issue #11, item 4).

use std::borrow::Cow;

use serde::Deserialize;

/// The `detectors:` block of a policy's `masking:` settings, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectorsSpec {}

/// Compiled detectors: cheap to share, `Sync`, no per-call allocation when nothing matches.
#[derive(Debug, Clone, Default)]
pub struct Detectors {}

/// One detector's hits in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hits {
    /// The detector's stable id (`aws-access-key`, `pem-private-key`, ...).
    pub detector: &'static str,
    /// How many values it replaced.
    pub count: u32,
}

impl Detectors {
    /// Compiles a spec; the error names what is wrong (the caller adds file:line).
    pub fn compile(spec: &DetectorsSpec) -> Result<Detectors, String> {
        let DetectorsSpec {} = spec;
        Ok(Detectors {})
    }

    /// `text` with every detected credential replaced, and what was replaced; borrows the
    /// input unchanged when nothing was found (the common case costs no allocation).
    pub fn redact<'t>(&self, text: &'t str, hits: &mut Vec<Hits>) -> Cow<'t, str> {
        let _ = hits;
        Cow::Borrowed(text)
    }
}
