//! The JSON tree the object masker works on: strings and keys borrowed from the body they
//! were read from, fields kept in the order they came.
//!
//! `serde_json::Value` allocates every string and every key and sorts each object into a
//! `BTreeMap`, and writing it back escapes every string again; for a Pod list that was
//! half of the time masking took (docs/benchmarks.md, session 18). Here a string without
//! escapes stays a slice of the body and is written back as it was read; only strings with
//! escapes, and the values masking replaces, are owned.
//!
//! Repeated keys in one object are resolved as `Value` (and Go's and Python's decoders)
//! resolve them: the last one wins and the earlier ones are dropped, so no masked field
//! can hide behind a copy of itself that a client might read instead.

use std::{borrow::Cow, collections::HashSet, fmt};

use serde::de::{Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

/// An object's fields, in the order they came, without repeated keys.
pub(crate) type Fields<'a> = Vec<(Cow<'a, str>, Node<'a>)>;

/// One JSON value.
///
/// Invariant: a `Cow::Borrowed` string (value or key) holds nothing JSON escapes (`"`,
/// `\`, control characters), so it is written back without a scan. The parser borrows
/// only strings that had no escapes, and the masker's own borrowed strings are the
/// placeholders (checked by a test).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Node<'a> {
    #[default]
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    Object(Fields<'a>),
}

impl<'a> Node<'a> {
    /// Reads one JSON document (nothing but whitespace may follow it).
    pub(crate) fn parse(text: &'a [u8]) -> Result<Self, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(text);
        let node = Node::deserialize(&mut de)?;
        de.end()?;
        Ok(node)
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Node::String(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn is_array(&self) -> bool {
        matches!(self, Node::Array(_))
    }

    pub(crate) fn is_string(&self) -> bool {
        matches!(self, Node::String(_))
    }

    /// The field `key` of an object; `None` for anything else.
    #[cfg(test)]
    pub(crate) fn get(&self, key: &str) -> Option<&Node<'a>> {
        match self {
            Node::Object(fields) => field(fields, key),
            _ => None,
        }
    }

    /// The field `key` of an object, to change; `None` for anything else.
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut Node<'a>> {
        match self {
            Node::Object(fields) => field_mut(fields, key),
            _ => None,
        }
    }

    /// Appends the compact JSON text of this value (as `serde_json::to_writer` writes it,
    /// but with fields in the order they came).
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        match self {
            Node::Null => out.extend_from_slice(b"null"),
            Node::Bool(true) => out.extend_from_slice(b"true"),
            Node::Bool(false) => out.extend_from_slice(b"false"),
            Node::Number(n) => {
                // Writing to a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, n);
            }
            Node::String(s) => write_str(s, out),
            Node::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write(out);
                }
                out.push(b']');
            }
            Node::Object(fields) => {
                out.push(b'{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_str(key, out);
                    out.push(b':');
                    value.write(out);
                }
                out.push(b'}');
            }
        }
    }

    /// The compact JSON text of this value.
    pub(crate) fn to_json_string(&self) -> String {
        let mut out = Vec::new();
        self.write(&mut out);
        // Everything written is UTF-8: borrowed strings were checked by the parser, owned
        // ones are `String`s, and escapes and punctuation are ASCII.
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into())
    }
}

/// The field `key` of an object's fields.
pub(crate) fn field<'n, 'a>(
    fields: &'n [(Cow<'a, str>, Node<'a>)],
    key: &str,
) -> Option<&'n Node<'a>> {
    fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// The field `key` of an object's fields, to change.
pub(crate) fn field_mut<'n, 'a>(
    fields: &'n mut [(Cow<'a, str>, Node<'a>)],
    key: &str,
) -> Option<&'n mut Node<'a>> {
    fields.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
}

#[expect(
    clippy::ptr_arg,
    reason = "borrowed or owned is what decides whether the string is escaped"
)]
fn write_str(s: &Cow<'_, str>, out: &mut Vec<u8>) {
    match s {
        Cow::Borrowed(raw) => {
            debug_assert!(
                !raw.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20),
                "a borrowed string that JSON escapes: {raw:?}"
            );
            out.push(b'"');
            out.extend_from_slice(raw.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(text) => {
            // Writing to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, text);
        }
    }
}

/// Drops every field whose key comes again later in the object, keeping the last.
fn keep_last_of_repeated(fields: &mut Fields<'_>) {
    let n = fields.len();
    // Small objects (nearly all of a Kubernetes object's) are checked pairwise, without
    // hashing; large ones (a ConfigMap's data, annotations) with a set.
    let repeated = if n <= 16 {
        (1..n).any(|j| fields[..j].iter().any(|(k, _)| *k == fields[j].0))
    } else {
        let mut seen = HashSet::with_capacity(n);
        !fields.iter().all(|(k, _)| seen.insert(k.as_ref()))
    };
    if !repeated {
        return;
    }
    let mut seen = HashSet::with_capacity(n);
    let mut keep = vec![false; n];
    for (i, (k, _)) in fields.iter().enumerate().rev() {
        keep[i] = seen.insert(k.as_ref());
    }
    drop(seen);
    let mut i = 0;
    fields.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

/// Only for serde_json's readers of bytes (`from_slice`, its stream and seq access), which
/// borrow a string only when it had no escapes: a deserializer that hands out decoded
/// text as borrowed (`&Value`'s) would break [`Node`]'s invariant.
impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        Node::deserialize(d)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node<'de>, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node<'de>, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node<'de>, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node<'de>, E> {
        // As `serde_json::Value`: a float JSON cannot hold becomes null (the parser never
        // produces one).
        Ok(Number::from_f64(v).map_or(Node::Null, Node::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(key) = map.next_key_seed(Key)? {
            fields.push((key, map.next_value()?));
        }
        keep_last_of_repeated(&mut fields);
        Ok(Node::Object(fields))
    }
}

/// An object key, borrowed when it had no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// Reads `text` with both parsers and checks that the tree writes what `Value` decodes.
    fn same_as_value(text: &str) -> Node<'_> {
        let node = Node::parse(text.as_bytes()).unwrap();
        let written = node.to_json_string();
        let want: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&written).unwrap(),
            want,
            "{text}"
        );
        node
    }

    #[test]
    fn strings_without_escapes_stay_borrowed_and_come_back_as_they_were() {
        let text = r#"{"b":"plain","a":"tab\there","n":[1,-2,3.5,1e300,true,null],"é":"ü\u00e9"}"#;
        let node = same_as_value(text);
        let Node::Object(fields) = &node else {
            panic!("not an object: {node:?}");
        };
        assert!(matches!(fields[0].0, Cow::Borrowed("b")));
        assert!(matches!(
            node.get("b"),
            Some(Node::String(Cow::Borrowed("plain")))
        ));
        assert!(matches!(node.get("a"), Some(Node::String(Cow::Owned(_)))));
        // Order kept, escapes rewritten as serde_json writes them.
        assert_eq!(
            node.to_json_string(),
            r#"{"b":"plain","a":"tab\there","n":[1,-2,3.5,1e+300,true,null],"é":"üé"}"#
        );
    }

    /// The masker writes its placeholders as borrowed strings, which are written back
    /// without escaping.
    #[test]
    fn the_placeholders_need_no_escaping() {
        use crate::masking::objects::{PLACEHOLDER_BASE64, PLACEHOLDER_TEXT};
        for text in [PLACEHOLDER_TEXT, PLACEHOLDER_BASE64] {
            assert_eq!(serde_json::to_string(text).unwrap(), format!("\"{text}\""));
        }
    }

    #[test]
    fn a_repeated_key_keeps_only_its_last_value() {
        for n in [2, 20] {
            let mut fields: Vec<String> = (0..n).map(|i| format!("\"k{i}\":{i}")).collect();
            fields.insert(1, "\"data\":\"first\"".into());
            fields.push("\"data\":\"last\"".into());
            let text = format!("{{{}}}", fields.join(","));
            let node = same_as_value(&text);
            assert_eq!(node.get("data").and_then(Node::as_str), Some("last"));
            assert_eq!(
                node.to_json_string().matches("\"data\"").count(),
                1,
                "{text}"
            );
        }
    }

    #[test]
    fn garbage_and_trailing_text_are_errors() {
        for bad in [
            &b"{"[..],
            b"{\"a\":}",
            b"[1,]",
            b"{} x",
            b"\"\xff\"",
            b"nul",
        ] {
            assert!(
                Node::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(
            Node::parse(deep.as_bytes()).is_err(),
            "nesting past serde_json's limit"
        );
        assert_eq!(Node::parse(b" {} ").unwrap(), Node::Object(Vec::new()));
    }

    #[test]
    fn numbers_are_written_as_value_writes_them() {
        let v = json!([0, u64::MAX, i64::MIN, 0.1, -1.5e-7, 12345678.9]);
        let text = v.to_string();
        assert_eq!(Node::parse(text.as_bytes()).unwrap().to_json_string(), text);
    }
}
