//! A minimal Kubernetes protobuf writer for tests: enough to build the bodies kubectl's
//! typed clients send, field by field.

use gateway_userspace::protobuf::MAGIC;

/// A message under construction: fields are appended in call order.
#[derive(Debug, Default, Clone)]
pub struct Msg(pub Vec<u8>);

impl Msg {
    /// Appends a varint field (int32, int64, bool, enum).
    pub fn varint(mut self, number: u64, value: u64) -> Self {
        put_varint(&mut self.0, number << 3);
        put_varint(&mut self.0, value);
        self
    }

    /// Appends a length-delimited field.
    pub fn bytes(mut self, number: u64, value: &[u8]) -> Self {
        put_varint(&mut self.0, (number << 3) | 2);
        put_varint(&mut self.0, value.len() as u64);
        self.0.extend_from_slice(value);
        self
    }

    /// Appends a string field.
    pub fn str(self, number: u64, value: &str) -> Self {
        self.bytes(number, value.as_bytes())
    }

    /// Appends an embedded message.
    pub fn msg(self, number: u64, value: Msg) -> Self {
        self.bytes(number, &value.0)
    }

    /// Appends one entry of a `map<string, message>` field.
    pub fn entry(self, number: u64, key: &str, value: Msg) -> Self {
        self.msg(number, Msg::default().str(1, key).msg(2, value))
    }

    /// Appends one entry of a `map<string, string>` field.
    pub fn str_entry(self, number: u64, key: &str, value: &str) -> Self {
        self.msg(number, Msg::default().str(1, key).str(2, value))
    }
}

/// Appends `v` as a base-128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Wraps an object's message in the `k8s\0` + `runtime.Unknown` envelope.
pub fn envelope(api_version: &str, kind: &str, raw: Msg) -> Vec<u8> {
    let unknown = Msg::default()
        .msg(1, Msg::default().str(1, api_version).str(2, kind))
        .msg(2, raw)
        .str(3, "")
        .str(4, "");
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&unknown.0);
    out
}
