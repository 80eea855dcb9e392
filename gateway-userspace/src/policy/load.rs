//! Load errors, located: every error names the file, the YAML path and, where known,
//! the line and column.

use super::*;

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

pub(super) fn located(
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
// ---------------------------------------------------------------------------------------
// Error locations.

/// Turns a serde error into a [`PolicyError::Syntax`] with line, column and YAML path.
pub(super) fn syntax_error(
    source: &str,
    err: serde_path_to_error::Error<serde_norway::Error>,
) -> PolicyError {
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
pub(super) const FOUND: &str = "chaperone-policy-location-marker";

/// Line and column of the node at `path` in `text`. serde_norway stamps an error with the
/// position of the node being deserialized, so a second pass that walks to the node and
/// fails there yields its position. Only runs on the error path.
pub(super) fn locate(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    let err = Locate(path)
        .deserialize(serde_norway::Deserializer::from_str(text))
        .err()?;
    if !err.to_string().contains(FOUND) {
        return None;
    }
    err.location().map(|l| (l.line(), l.column()))
}

pub(super) struct Locate<'p>(&'p [Seg]);

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.0.split_first() {
            None => d.deserialize_any(Found),
            Some((Seg::Key(key), rest)) => d.deserialize_map(LocateInMap { key, rest }),
            Some((Seg::Field(key), rest)) => d.deserialize_map(LocateInMap { key, rest }),
            Some((Seg::Index(index), rest)) => d.deserialize_seq(LocateInSeq {
                index: *index,
                rest,
            }),
        }
    }
}

/// Fails on whatever node it is given; serde's default `visit_*` methods all fail.
pub(super) struct Found;

impl Visitor<'_> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FOUND)
    }
}

pub(super) struct LocateInMap<'p> {
    pub(super) key: &'p str,
    pub(super) rest: &'p [Seg],
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
pub(super) struct KeyName(Option<String>);

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

pub(super) struct LocateInSeq<'p> {
    pub(super) index: usize,
    pub(super) rest: &'p [Seg],
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
