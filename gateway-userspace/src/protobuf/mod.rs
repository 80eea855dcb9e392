//! Kubernetes protobuf request bodies, transcoded to the JSON the API server would accept
//! for the same object.
//!
//! kubectl 1.32's typed clients send Create, Update, Delete and Apply bodies as
//! `application/vnd.kubernetes.protobuf` (`kubectl create configmap`, `auth can-i`, ...).
//! The gateway must see those objects (policy, recording), so it decodes them with the
//! schema in `schema.txt` (every built-in message: field numbers and wire types from
//! k8s-pb, JSON names from k8s-openapi; `cargo xtask gen-protobuf` writes it) and forwards
//! the JSON instead. The API server accepts either encoding for the same object.
//!
//! The JSON follows the API machinery's own conversions: `metav1.Time` as RFC 3339
//! (zero as `null`), `MicroTime` with microseconds, `Duration` as a Go duration string,
//! `Quantity` and `IntOrString` as their scalar forms, `[]byte` as base64, embedded
//! (`json:",inline"`) structs merged into their parent, and `RawExtension`/`FieldsV1`/`JSON`
//! as the JSON they carry (an embedded protobuf object is transcoded in turn).
//!
//! Anything that cannot be transcoded faithfully is refused rather than guessed at: a
//! field number the schema does not know (a newer Kubernetes than the schema's), a kind it
//! does not know (custom resources are never sent as protobuf), malformed wire data,
//! invalid UTF-8, or nesting deeper than [`MAX_DEPTH`]. Dropping an unknown field would
//! silently change the object the API server receives.

use std::collections::HashMap;
use std::sync::LazyLock;

use base64::Engine as _;
use serde_json::{Map, Value};

/// The four bytes every Kubernetes protobuf body starts with (`k8s\0`).
pub const MAGIC: &[u8; 4] = b"k8s\0";

/// The media type of Kubernetes protobuf bodies.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// Deepest message nesting accepted (real objects stay far below; a hostile body could
/// otherwise exhaust the stack).
pub const MAX_DEPTH: usize = 64;

/// Why a protobuf body could not be transcoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtobufError {
    /// The body lacks the `k8s\0` prefix.
    #[error("not a Kubernetes protobuf body: it does not start with the bytes \"k8s\\0\"")]
    NoMagic,
    /// The envelope has no apiVersion/kind.
    #[error("the protobuf envelope (runtime.Unknown) names no kind")]
    NoKind,
    /// The envelope's object is compressed or otherwise encoded.
    #[error(
        "the protobuf envelope has contentEncoding {0:?}; only unencoded objects are supported"
    )]
    ContentEncoding(String),
    /// The kind is not in the built-in schema.
    #[error(
        "kind {kind:?} of apiVersion {api_version:?} is not a built-in Kubernetes type the gateway can decode from protobuf"
    )]
    UnknownKind {
        /// `apiVersion` from the envelope.
        api_version: String,
        /// `kind` from the envelope.
        kind: String,
    },
    /// A field number the schema does not have: transcoding would drop it.
    #[error(
        "{message}: field number {number} is not in the gateway's schema (newer Kubernetes?); refusing rather than dropping it"
    )]
    UnknownField {
        /// The message being decoded.
        message: String,
        /// The unknown field number.
        number: u64,
    },
    /// Wire data that does not parse.
    #[error("{message}: malformed protobuf: {what}")]
    Malformed {
        /// The message being decoded.
        message: String,
        /// What is wrong.
        what: String,
    },
    /// Nesting beyond [`MAX_DEPTH`].
    #[error("objects nested more than {MAX_DEPTH} deep")]
    TooDeep,
    /// The embedded schema failed to load (a build defect; covered by a unit test).
    #[error("the built-in protobuf schema is invalid: {0}")]
    Schema(String),
}

/// A decoded body: the object as the JSON the API server would accept.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcoded {
    /// `apiVersion` from the envelope.
    pub api_version: String,
    /// `kind` from the envelope.
    pub kind: String,
    /// The object, with `apiVersion` and `kind` set.
    pub object: Value,
}

/// Decodes an enveloped protobuf body (`k8s\0` + `runtime.Unknown`) into JSON.
pub fn transcode(body: &[u8]) -> Result<Transcoded, ProtobufError> {
    let schema = schema()?;
    transcode_with(schema, body, 0)
}

fn transcode_with(schema: &Schema, body: &[u8], depth: usize) -> Result<Transcoded, ProtobufError> {
    let rest = body
        .strip_prefix(MAGIC.as_slice())
        .ok_or(ProtobufError::NoMagic)?;
    let envelope = Envelope::parse(rest)?;
    if !envelope.content_encoding.is_empty() {
        return Err(ProtobufError::ContentEncoding(envelope.content_encoding));
    }
    if envelope.kind.is_empty() {
        return Err(ProtobufError::NoKind);
    }
    let message = schema
        .kind(&envelope.api_version, &envelope.kind)
        .ok_or_else(|| ProtobufError::UnknownKind {
            api_version: envelope.api_version.clone(),
            kind: envelope.kind.clone(),
        })?;
    let mut object = Map::new();
    object.insert("kind".into(), Value::String(envelope.kind.clone()));
    object.insert(
        "apiVersion".into(),
        Value::String(envelope.api_version.clone()),
    );
    Decoder { schema, depth }.fields_into(message, envelope.raw, &mut object)?;
    Ok(Transcoded {
        api_version: envelope.api_version,
        kind: envelope.kind,
        object: Value::Object(object),
    })
}

/// `runtime.Unknown`, the envelope of every protobuf body.
struct Envelope<'a> {
    api_version: String,
    kind: String,
    raw: &'a [u8],
    content_encoding: String,
}

impl<'a> Envelope<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, ProtobufError> {
        const NAME: &str = "runtime.Unknown";
        let mut out = Envelope {
            api_version: String::new(),
            kind: String::new(),
            raw: &[],
            content_encoding: String::new(),
        };
        let mut r = Reader::new(bytes, NAME);
        while let Some((number, value)) = r.field()? {
            match (number, value) {
                (1, Wire::Bytes(type_meta)) => {
                    let mut t = Reader::new(type_meta, "runtime.TypeMeta");
                    while let Some((n, v)) = t.field()? {
                        match (n, v) {
                            (1, Wire::Bytes(b)) => out.api_version = utf8(b, "runtime.TypeMeta")?,
                            (2, Wire::Bytes(b)) => out.kind = utf8(b, "runtime.TypeMeta")?,
                            (n, _) => return Err(unknown("runtime.TypeMeta", n)),
                        }
                    }
                }
                (2, Wire::Bytes(raw)) => out.raw = raw,
                (3, Wire::Bytes(b)) => out.content_encoding = utf8(b, NAME)?,
                // contentType names the raw bytes' media type; protobuf is all that is sent.
                (4, Wire::Bytes(_)) => {}
                (n, _) => return Err(unknown(NAME, n)),
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Schema

static SCHEMA: LazyLock<Result<Schema, String>> =
    LazyLock::new(|| Schema::parse(include_str!("schema.txt")));

fn schema() -> Result<&'static Schema, ProtobufError> {
    SCHEMA
        .as_ref()
        .map_err(|e| ProtobufError::Schema(e.clone()))
}

/// Every message the transcoder knows, indexed for decoding.
struct Schema {
    messages: Vec<Message>,
    by_name: HashMap<String, usize>,
    /// (apiVersion, kind) → message, from the `K` lines.
    kinds: HashMap<(String, String), usize>,
    /// apiVersion → module, from the `G` lines.
    modules: HashMap<String, String>,
}

struct Message {
    name: String,
    shape: Shape,
    /// Sorted by number.
    fields: Vec<FieldDef>,
}

/// How a message appears in JSON when it is not a plain object.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Object,
    /// A `[]string`-like named type: the `items` array.
    Items,
    Time,
    MicroTime,
    Duration,
    Quantity,
    IntOrString,
    /// RawExtension, FieldsV1, apiextensions JSON: field 1 holds JSON (or a protobuf object).
    RawJson,
    /// JSONSchemaPropsOr{Array,Bool,StringArray}: whichever alternative is set.
    Either,
}

struct FieldDef {
    number: u64,
    json: String,
    label: Label,
    ty: Type,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Optional,
    Repeated,
    Map,
    Inline,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Type {
    String,
    Bytes,
    Bool,
    Int32,
    Int64,
    Uint32,
    Uint64,
    Double,
    Float,
    Message(usize),
}

impl Schema {
    fn parse(text: &str) -> Result<Self, String> {
        // Two passes: message references may point forward.
        let mut by_name = HashMap::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("M ").or_else(|| line.strip_prefix("A ")) {
                let index = by_name.len();
                by_name.insert(name.to_owned(), index);
            }
        }
        let mut messages: Vec<Message> = Vec::with_capacity(by_name.len());
        let mut kinds = HashMap::new();
        let mut modules = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let bad = |what: &str| format!("schema.txt line {}: {what}: {line:?}", n + 1);
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                [] | [""] => {}
                [first, ..] if first.starts_with('#') => {}
                ["K", api_version, kind, message] => {
                    let index = *by_name
                        .get(*message)
                        .ok_or_else(|| bad("unknown message"))?;
                    kinds.insert(((*api_version).to_owned(), (*kind).to_owned()), index);
                }
                ["G", api_version, module] => {
                    modules.insert((*api_version).to_owned(), (*module).to_owned());
                }
                [tag @ ("M" | "A"), name] => messages.push(Message {
                    name: (*name).to_owned(),
                    shape: if *tag == "A" {
                        Shape::Items
                    } else {
                        special_shape(name)
                    },
                    fields: Vec::new(),
                }),
                ["F", number, json, label, ty] => {
                    let message = messages
                        .last_mut()
                        .ok_or_else(|| bad("field outside a message"))?;
                    let ty = match *ty {
                        "string" => Type::String,
                        "bytes" => Type::Bytes,
                        "bool" => Type::Bool,
                        "int32" => Type::Int32,
                        "int64" => Type::Int64,
                        "uint32" => Type::Uint32,
                        "uint64" => Type::Uint64,
                        "double" => Type::Double,
                        "float" => Type::Float,
                        name => {
                            Type::Message(*by_name.get(name).ok_or_else(|| bad("unknown type"))?)
                        }
                    };
                    let label = match *label {
                        "o" => Label::Optional,
                        "r" => Label::Repeated,
                        "m" => Label::Map,
                        "i" => Label::Inline,
                        _ => return Err(bad("unknown label")),
                    };
                    message.fields.push(FieldDef {
                        number: number.parse().map_err(|_| bad("bad field number"))?,
                        json: (*json).to_owned(),
                        label,
                        ty,
                    });
                }
                _ => return Err(bad("unrecognised line")),
            }
        }
        for m in &mut messages {
            m.fields.sort_by_key(|f| f.number);
        }
        Ok(Schema {
            messages,
            by_name,
            kinds,
            modules,
        })
    }

    fn kind(&self, api_version: &str, kind: &str) -> Option<usize> {
        if let Some(&m) = self.kinds.get(&(api_version.to_owned(), kind.to_owned())) {
            return Some(m);
        }
        // Options kinds (DeleteOptions, CreateOptions, ...) are registered in every group
        // version but defined once, in meta/v1.
        let module = self.modules.get(api_version).map(String::as_str);
        [module, Some("apimachinery.pkg.apis.meta.v1")]
            .into_iter()
            .flatten()
            .find_map(|module| self.by_name.get(&format!("{module}.{kind}")).copied())
    }
}

fn special_shape(name: &str) -> Shape {
    let (module, short) = name.rsplit_once('.').unwrap_or(("", name));
    match (module, short) {
        ("apimachinery.pkg.apis.meta.v1", "Time") => Shape::Time,
        ("apimachinery.pkg.apis.meta.v1", "MicroTime") => Shape::MicroTime,
        ("apimachinery.pkg.apis.meta.v1", "Duration") => Shape::Duration,
        ("apimachinery.pkg.apis.meta.v1", "FieldsV1") => Shape::RawJson,
        ("apimachinery.pkg.api.resource", "Quantity") => Shape::Quantity,
        ("apimachinery.pkg.util.intstr", "IntOrString") => Shape::IntOrString,
        ("apimachinery.pkg.runtime", "RawExtension") => Shape::RawJson,
        (m, "Json") if m.starts_with("apiextensions_apiserver.") => Shape::RawJson,
        (m, s)
            if m.starts_with("apiextensions_apiserver.") && s.starts_with("JsonSchemaPropsOr") =>
        {
            Shape::Either
        }
        _ => Shape::Object,
    }
}

// ---------------------------------------------------------------------------------------
// Wire format

enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    message: &'a str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], message: &'a str) -> Self {
        Reader {
            bytes,
            pos: 0,
            message,
        }
    }

    fn malformed(&self, what: impl Into<String>) -> ProtobufError {
        ProtobufError::Malformed {
            message: self.message.to_owned(),
            what: what.into(),
        }
    }

    fn varint(&mut self) -> Result<u64, ProtobufError> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = *self
                .bytes
                .get(self.pos)
                .ok_or_else(|| self.malformed("truncated varint"))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.malformed("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtobufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.malformed(format!("a length of {n} runs past the end")))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next (field number, value), or `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Wire<'a>)>, ProtobufError> {
        if self.pos >= self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err(self.malformed("field number 0"));
        }
        let value = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                let b = self.take(8)?;
                Wire::Fixed64(u64::from_le_bytes(
                    b.try_into().map_err(|_| self.malformed("fixed64"))?,
                ))
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| self.malformed("length overflows"))?;
                Wire::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Wire::Fixed32(u32::from_le_bytes(
                    b.try_into().map_err(|_| self.malformed("fixed32"))?,
                ))
            }
            w => {
                return Err(
                    self.malformed(format!("wire type {w} (groups are not used by Kubernetes)"))
                );
            }
        };
        Ok(Some((number, value)))
    }
}

fn unknown(message: &str, number: u64) -> ProtobufError {
    ProtobufError::UnknownField {
        message: message.to_owned(),
        number,
    }
}

fn utf8(bytes: &[u8], message: &str) -> Result<String, ProtobufError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtobufError::Malformed {
        message: message.to_owned(),
        what: "a string field is not valid UTF-8".to_owned(),
    })
}

// ---------------------------------------------------------------------------------------
// Decoding into JSON

struct Decoder<'s> {
    schema: &'s Schema,
    depth: usize,
}

impl Decoder<'_> {
    /// Decodes one message into its JSON value, honouring its [`Shape`].
    fn message(&self, index: usize, bytes: &[u8]) -> Result<Value, ProtobufError> {
        let m = &self.schema.messages[index];
        let deeper = Decoder {
            schema: self.schema,
            depth: self.depth + 1,
        };
        if deeper.depth > MAX_DEPTH {
            return Err(ProtobufError::TooDeep);
        }
        let mut fields = Map::new();
        deeper.fields_into(index, bytes, &mut fields)?;
        let get = |name: &str| fields.get(name).cloned();
        let malformed = |what: &str| ProtobufError::Malformed {
            message: m.name.clone(),
            what: what.to_owned(),
        };
        Ok(match m.shape {
            Shape::Object => Value::Object(fields),
            Shape::Items => get("items").unwrap_or_else(|| Value::Array(Vec::new())),
            Shape::Time | Shape::MicroTime => {
                let seconds = fields.get("seconds").and_then(Value::as_i64).unwrap_or(0);
                let nanos = fields.get("nanos").and_then(Value::as_i64).unwrap_or(0);
                if seconds == 0 && nanos == 0 {
                    Value::Null
                } else {
                    let t = jiff::Timestamp::new(seconds, i32::try_from(nanos).unwrap_or(0))
                        .map_err(|e| malformed(&format!("time out of range: {e}")))?;
                    Value::String(if m.shape == Shape::Time {
                        t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
                    } else {
                        t.strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()
                    })
                }
            }
            Shape::Duration => Value::String(go_duration(
                fields.get("duration").and_then(Value::as_i64).unwrap_or(0),
            )),
            Shape::Quantity => get("string").unwrap_or_else(|| Value::String(String::new())),
            Shape::IntOrString => match fields.get("type").and_then(Value::as_i64).unwrap_or(0) {
                0 => get("intVal").unwrap_or(Value::from(0)),
                1 => get("strVal").unwrap_or_else(|| Value::String(String::new())),
                t => return Err(malformed(&format!("IntOrString type {t}"))),
            },
            Shape::RawJson => {
                let raw = fields
                    .get("raw")
                    .or_else(|| fields.get("Raw"))
                    .and_then(Value::as_str)
                    .map(|b64| base64::engine::general_purpose::STANDARD.decode(b64))
                    .transpose()
                    .map_err(|_| malformed("raw bytes"))?
                    .unwrap_or_default();
                self.raw_json(&m.name, &raw)?
            }
            Shape::Either => {
                let alternatives = m.fields.iter().map(|f| f.json.as_str());
                alternatives
                    .filter_map(|name| fields.get(name))
                    .find(|v| !matches!(v, Value::Array(a) if a.is_empty()))
                    .cloned()
                    .unwrap_or(Value::Null)
            }
        })
    }

    /// The JSON that a RawExtension-like field carries: JSON text, or an enveloped
    /// protobuf object (how protobuf clients embed objects).
    fn raw_json(&self, message: &str, raw: &[u8]) -> Result<Value, ProtobufError> {
        if raw.is_empty() {
            return Ok(Value::Null);
        }
        if raw.starts_with(MAGIC) {
            return Ok(transcode_with(self.schema, raw, self.depth + 1)?.object);
        }
        serde_json::from_slice(raw).map_err(|e| ProtobufError::Malformed {
            message: message.to_owned(),
            what: format!("embedded object is neither protobuf nor JSON: {e}"),
        })
    }

    /// Decodes the fields of message `index` from `bytes` into `out`.
    fn fields_into(
        &self,
        index: usize,
        bytes: &[u8],
        out: &mut Map<String, Value>,
    ) -> Result<(), ProtobufError> {
        let m = &self.schema.messages[index];
        let mut r = Reader::new(bytes, &m.name);
        while let Some((number, wire)) = r.field()? {
            let Ok(at) = m.fields.binary_search_by_key(&number, |f| f.number) else {
                return Err(unknown(&m.name, number));
            };
            let f = &m.fields[at];
            match f.label {
                Label::Optional => {
                    let v = self.single(&m.name, f.ty, wire)?;
                    out.insert(f.json.clone(), v);
                }
                Label::Repeated => {
                    let list = out
                        .entry(f.json.clone())
                        .or_insert_with(|| Value::Array(Vec::new()));
                    let Value::Array(list) = list else {
                        return Err(ProtobufError::Malformed {
                            message: m.name.clone(),
                            what: format!("{} is both inline and repeated", f.json),
                        });
                    };
                    match (wire, f.ty) {
                        // Packed scalars: proto2 Kubernetes writes them unpacked, but a
                        // decoder must accept both.
                        (Wire::Bytes(b), t)
                            if !matches!(t, Type::String | Type::Bytes | Type::Message(_)) =>
                        {
                            let mut p = Reader::new(b, &m.name);
                            while p.pos < b.len() {
                                let w = match t {
                                    Type::Double => Wire::Fixed64(u64::from_le_bytes(
                                        p.take(8)?.try_into().unwrap_or([0; 8]),
                                    )),
                                    Type::Float => Wire::Fixed32(u32::from_le_bytes(
                                        p.take(4)?.try_into().unwrap_or([0; 4]),
                                    )),
                                    _ => Wire::Varint(p.varint()?),
                                };
                                list.push(self.single(&m.name, t, w)?);
                            }
                        }
                        (w, t) => list.push(self.single(&m.name, t, w)?),
                    }
                }
                Label::Map => {
                    let Wire::Bytes(entry) = wire else {
                        return Err(wrong_wire(&m.name, &f.json));
                    };
                    let (key, value) = self.map_entry(&m.name, f.ty, entry)?;
                    let map = out
                        .entry(f.json.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(map) = map {
                        map.insert(key, value);
                    }
                }
                Label::Inline => {
                    let (Wire::Bytes(b), Type::Message(inner)) = (wire, f.ty) else {
                        return Err(wrong_wire(&m.name, &f.json));
                    };
                    let deeper = Decoder {
                        schema: self.schema,
                        depth: self.depth + 1,
                    };
                    if deeper.depth > MAX_DEPTH {
                        return Err(ProtobufError::TooDeep);
                    }
                    deeper.fields_into(inner, b, out)?;
                }
            }
        }
        Ok(())
    }

    fn map_entry(
        &self,
        message: &str,
        ty: Type,
        entry: &[u8],
    ) -> Result<(String, Value), ProtobufError> {
        let mut r = Reader::new(entry, message);
        let mut key = String::new();
        let mut value = None;
        while let Some((n, w)) = r.field()? {
            match (n, w) {
                (1, Wire::Bytes(b)) => key = utf8(b, message)?,
                (2, w) => value = Some(self.single(message, ty, w)?),
                (n, _) => return Err(unknown(&format!("{message} map entry"), n)),
            }
        }
        let value = match value {
            Some(v) => v,
            // An absent value is the type's zero value.
            None => self.single(message, ty, zero_wire(ty))?,
        };
        Ok((key, value))
    }

    fn single(&self, message: &str, ty: Type, wire: Wire<'_>) -> Result<Value, ProtobufError> {
        Ok(match (ty, wire) {
            (Type::String, Wire::Bytes(b)) => Value::String(utf8(b, message)?),
            (Type::Bytes, Wire::Bytes(b)) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            (Type::Message(index), Wire::Bytes(b)) => self.message(index, b)?,
            (Type::Bool, Wire::Varint(v)) => Value::Bool(v != 0),
            // int32 is sign-extended to 64 bits on the wire.
            (Type::Int32, Wire::Varint(v)) => Value::from(v as i64 as i32),
            (Type::Int64, Wire::Varint(v)) => Value::from(v as i64),
            (Type::Uint32, Wire::Varint(v)) => Value::from(v as u32),
            (Type::Uint64, Wire::Varint(v)) => Value::from(v),
            (Type::Double, Wire::Fixed64(v)) => finite(message, f64::from_bits(v))?,
            (Type::Float, Wire::Fixed32(v)) => finite(message, f64::from(f32::from_bits(v)))?,
            _ => {
                return Err(ProtobufError::Malformed {
                    message: message.to_owned(),
                    what: "a field's wire type does not match its declared type".to_owned(),
                });
            }
        })
    }
}

fn zero_wire(ty: Type) -> Wire<'static> {
    match ty {
        Type::String | Type::Bytes | Type::Message(_) => Wire::Bytes(&[]),
        Type::Double => Wire::Fixed64(0),
        Type::Float => Wire::Fixed32(0),
        _ => Wire::Varint(0),
    }
}

fn wrong_wire(message: &str, field: &str) -> ProtobufError {
    ProtobufError::Malformed {
        message: message.to_owned(),
        what: format!("field {field} has the wrong wire type"),
    }
}

fn finite(message: &str, v: f64) -> Result<Value, ProtobufError> {
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .ok_or_else(|| ProtobufError::Malformed {
            message: message.to_owned(),
            what: "a number is NaN or infinite, which JSON cannot carry".to_owned(),
        })
}

/// Formats nanoseconds as Go's `time.Duration.String()` does (`1h2m3.5s`, `150ms`, `0s`).
pub fn go_duration(nanos: i64) -> String {
    let negative = nanos < 0;
    let mut u = nanos.unsigned_abs();
    let mut out = String::new();
    if u < 1_000_000_000 {
        // Sub-second: the largest unit that keeps the integer part non-zero.
        let (unit, scale) = match u {
            0 => return "0s".to_owned(),
            1..1_000 => ("ns", 1),
            1_000..1_000_000 => ("µs", 1_000),
            _ => ("ms", 1_000_000),
        };
        out.push_str(&fraction(u, scale));
        out.push_str(unit);
    } else {
        let hours = u / 3_600_000_000_000;
        u %= 3_600_000_000_000;
        let minutes = u / 60_000_000_000;
        u %= 60_000_000_000;
        if hours > 0 {
            out.push_str(&format!("{hours}h"));
        }
        if hours > 0 || minutes > 0 {
            out.push_str(&format!("{minutes}m"));
        }
        out.push_str(&fraction(u, 1_000_000_000));
        out.push('s');
    }
    if negative {
        out.insert(0, '-');
    }
    out
}

/// `value / scale` with the fraction's trailing zeros removed (`1500, 1000` → `1.5`).
fn fraction(value: u64, scale: u64) -> String {
    let whole = value / scale;
    let rest = value % scale;
    if rest == 0 {
        return whole.to_string();
    }
    let digits = scale.ilog10() as usize;
    let frac = format!("{rest:0digits$}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests;
