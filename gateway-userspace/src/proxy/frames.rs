//! Decoders for the framing inside upgraded
//! Kubernetes streams: WebSocket (RFC 6455) carrying the `channel.k8s.io` protocols, and
//! SPDY/3.1 as spoken by `moby/spdystream` (exec, attach, port-forward).
//!
//! The decoders are passive: they are fed whatever bytes the relay happened to read, in
//! any chunking, and return whole frames. They never block and never own the connection;
//! a decoding error only means the tap stops understanding the stream
//! (`shared/k8s-wire-reference.md` sections 7.3 to 7.6).

use std::sync::OnceLock;

use flate2::{Decompress, FlushDecompress, Status};

/// Largest WebSocket message (after reassembly of fragments) the tap decodes; longer
/// ones stop decoding (kubectl sends at most 32 KiB per message).
pub const MAX_WS_MESSAGE: usize = 8 * 1024 * 1024;
/// Largest decompressed SPDY header block accepted.
pub const MAX_HEADER_BLOCK: usize = 1024 * 1024;

/// Errors decoding a stream; after one, the decoder refuses further input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A WebSocket frame violates RFC 6455.
    #[error("WebSocket: {0}")]
    WebSocket(String),
    /// A SPDY frame violates SPDY/3.1 or spdystream's use of it.
    #[error("SPDY: {0}")]
    Spdy(String),
    /// The SPDY header block does not inflate with the SPDY/3 dictionary.
    #[error("SPDY header block: {0}")]
    HeaderBlock(String),
    /// The decoder already failed and ignores further input.
    #[error("decoder stopped after an earlier error")]
    Stopped,
}

// ---------------------------------------------------------------------------------------
// WebSocket

/// WebSocket opcodes the tap distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsOpcode {
    /// UTF-8 text message.
    Text,
    /// Binary message.
    Binary,
    /// Close frame.
    Close,
    /// Ping frame.
    Ping,
    /// Pong frame.
    Pong,
}

/// One whole WebSocket message (data frames reassembled, payload unmasked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsMessage {
    /// The message type.
    pub opcode: WsOpcode,
    /// The unmasked payload.
    pub payload: Vec<u8>,
}

/// Incremental, passive WebSocket frame decoder for one direction.
#[derive(Debug, Default)]
pub struct WsDecoder {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf`; what is before it is cut off once per feed, not
    /// once per frame (which copied the rest of a read for every tiny frame).
    start: usize,
    fragments: Option<(WsOpcode, Vec<u8>)>,
    /// Reads every data frame as a message of its own ([`WsDecoder::per_frame`]); holds the
    /// type of the last data frame, which a continuation frame takes.
    per_frame: Option<Option<WsOpcode>>,
    failed: bool,
}

impl WsDecoder {
    /// A decoder at the start of a stream (right after the 101 response) that reassembles
    /// fragmented messages, as a client (gorilla/websocket's `NextReader`) reads them.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that reads each data frame as a message of its own, a continuation frame
    /// as one of the type the last data frame had. That is how the API server reads what
    /// a client sends on the `channel.k8s.io` protocols (`golang.org/x/net/websocket`
    /// receives single frames, and `wsstream` takes every frame's first byte as its
    /// channel), so the tap must read the client's frames the same way: a message
    /// reassembled from `[1]x` and `[0]rm -rf /` would look like stdout to the tap while
    /// the server writes the second frame to stdin.
    pub fn per_frame() -> Self {
        Self {
            per_frame: Some(None),
            ..Self::default()
        }
    }

    /// Whether everything fed so far formed whole frames, so a frame may be inserted here.
    pub fn at_frame_boundary(&self) -> bool {
        !self.failed && self.buf.len() == self.start
    }

    /// Feeds bytes and returns every message they complete.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<WsMessage>, FrameError> {
        if self.failed {
            return Err(FrameError::Stopped);
        }
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            match self.next_frame() {
                Ok(Some(msg)) => {
                    if let Some(m) = msg {
                        out.push(m);
                    }
                }
                Ok(None) => {
                    self.buf.drain(..self.start);
                    self.start = 0;
                    return Ok(out);
                }
                Err(e) => {
                    self.failed = true;
                    self.buf = Vec::new();
                    self.start = 0;
                    return Err(e);
                }
            }
        }
    }

    /// Parses one frame from the buffer: `Ok(None)` = need more bytes; `Ok(Some(None))` =
    /// a fragment was consumed without completing a message.
    fn next_frame(&mut self) -> Result<Option<Option<WsMessage>>, FrameError> {
        let buf = &self.buf[self.start..];
        let Some(head) = WsHead::parse(buf)? else {
            return Ok(None);
        };
        let WsHead {
            fin,
            opcode,
            mask,
            header_len: pos,
            payload_len: len,
        } = head;
        if buf.len() < pos + len {
            return Ok(None);
        }
        let mut payload: Vec<u8> = buf[pos..pos + len].to_vec();
        self.start += pos + len;
        if let Some(m) = mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= m[i % 4];
            }
        }
        let control = |op| match op {
            0x8 => Some(WsOpcode::Close),
            0x9 => Some(WsOpcode::Ping),
            0xA => Some(WsOpcode::Pong),
            _ => None,
        };
        if let Some(last) = &mut self.per_frame
            && opcode <= 0x2
        {
            let op = match opcode {
                0x1 => WsOpcode::Text,
                0x2 => WsOpcode::Binary,
                _ => last.ok_or_else(|| {
                    FrameError::WebSocket("continuation frame before any data frame".into())
                })?,
            };
            *last = Some(op);
            return Ok(Some(Some(WsMessage {
                opcode: op,
                payload,
            })));
        }
        match opcode {
            0x0 => {
                let Some((op, mut acc)) = self.fragments.take() else {
                    return Err(FrameError::WebSocket(
                        "continuation frame without a started message".into(),
                    ));
                };
                if acc.len() + payload.len() > MAX_WS_MESSAGE {
                    return Err(FrameError::WebSocket(format!(
                        "fragmented message exceeds the {MAX_WS_MESSAGE}-byte limit"
                    )));
                }
                acc.extend_from_slice(&payload);
                if fin {
                    Ok(Some(Some(WsMessage {
                        opcode: op,
                        payload: acc,
                    })))
                } else {
                    self.fragments = Some((op, acc));
                    Ok(Some(None))
                }
            }
            0x1 | 0x2 => {
                if self.fragments.is_some() {
                    return Err(FrameError::WebSocket(
                        "new data frame inside a fragmented message".into(),
                    ));
                }
                let op = if opcode == 1 {
                    WsOpcode::Text
                } else {
                    WsOpcode::Binary
                };
                if fin {
                    Ok(Some(Some(WsMessage {
                        opcode: op,
                        payload,
                    })))
                } else {
                    self.fragments = Some((op, payload));
                    Ok(Some(None))
                }
            }
            op => match control(op) {
                Some(_) if !fin || len > 125 => Err(FrameError::WebSocket(format!(
                    "control frame 0x{op:x} fragmented or longer than 125 bytes"
                ))),
                Some(c) => Ok(Some(Some(WsMessage { opcode: c, payload }))),
                None => Err(FrameError::WebSocket(format!("unknown opcode 0x{op:x}"))),
            },
        }
    }
}

/// Encodes one unfragmented WebSocket frame (`mask` for client-to-server frames).
pub fn ws_encode(opcode: WsOpcode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let op = match opcode {
        WsOpcode::Text => 0x1,
        WsOpcode::Binary => 0x2,
        WsOpcode::Close => 0x8,
        WsOpcode::Ping => 0x9,
        WsOpcode::Pong => 0xA,
    };
    let mut out = vec![0x80 | op];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

// ---------------------------------------------------------------------------------------
// SPDY/3.1

/// SPDY control frame types (SPDY/3 section 2.6).
pub mod spdy_type {
    /// SYN_STREAM.
    pub const SYN_STREAM: u16 = 1;
    /// SYN_REPLY.
    pub const SYN_REPLY: u16 = 2;
    /// RST_STREAM.
    pub const RST_STREAM: u16 = 3;
    /// SETTINGS.
    pub const SETTINGS: u16 = 4;
    /// PING.
    pub const PING: u16 = 6;
    /// GOAWAY.
    pub const GOAWAY: u16 = 7;
    /// HEADERS.
    pub const HEADERS: u16 = 8;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u16 = 9;
}

/// FLAG_FIN on SYN_STREAM, SYN_REPLY, HEADERS and DATA.
pub const SPDY_FLAG_FIN: u8 = 0x01;

/// A header block: lowercase names; multiple values stay NUL-joined as on the wire.
pub type SpdyHeaders = Vec<(String, String)>;

/// One decoded SPDY/3 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpdyFrame {
    /// A peer opens a stream.
    SynStream {
        /// Stream id.
        id: u32,
        /// Associated stream id.
        associated: u32,
        /// Frame flags.
        flags: u8,
        /// Decompressed headers.
        headers: SpdyHeaders,
    },
    /// The answer to a SYN_STREAM.
    SynReply {
        /// Stream id.
        id: u32,
        /// Frame flags.
        flags: u8,
        /// Decompressed headers.
        headers: SpdyHeaders,
    },
    /// A stream is reset.
    RstStream {
        /// Stream id.
        id: u32,
        /// Status code.
        status: u32,
    },
    /// Additional headers on a stream.
    Headers {
        /// Stream id.
        id: u32,
        /// Frame flags.
        flags: u8,
        /// Decompressed headers.
        headers: SpdyHeaders,
    },
    /// A ping to echo.
    Ping(u32),
    /// The session ends.
    GoAway {
        /// Last stream id the sender processed.
        last_good: u32,
        /// Status code.
        status: u32,
    },
    /// SETTINGS, WINDOW_UPDATE or an unknown control frame: no effect on the streams.
    OtherControl {
        /// Control frame type.
        kind: u16,
    },
    /// Stream data.
    Data {
        /// Stream id.
        id: u32,
        /// Frame flags (`SPDY_FLAG_FIN` half-closes).
        flags: u8,
        /// The payload.
        payload: Vec<u8>,
    },
}

impl SpdyFrame {
    /// Whether the frame carries FLAG_FIN.
    pub fn fin(&self) -> bool {
        match self {
            SpdyFrame::SynStream { flags, .. }
            | SpdyFrame::SynReply { flags, .. }
            | SpdyFrame::Headers { flags, .. }
            | SpdyFrame::Data { flags, .. } => flags & SPDY_FLAG_FIN != 0,
            _ => false,
        }
    }
}

/// A header's value by (lowercase) name: its first value, as spdystream reads it (it
/// splits NUL-joined values, and the kubelet takes the first). Reading the whole value
/// would let `streamtype: "stdout\0"` be stdout to the kubelet and unknown here.
pub fn spdy_header<'a>(headers: &'a SpdyHeaders, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.split('\0').next())
}

/// The SPDY/3 header compression dictionary (SPDY/3 draft section 2.6.10.1; identical to
/// `spdystream`'s `headerDictionary`): length-prefixed header names, then literal text.
pub fn spdy_dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: [&str; 65] = [
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412\
413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server \
Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov \
Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,\
image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivate\
max-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";
        let mut d = Vec::with_capacity(1423);
        for w in WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(TAIL.as_bytes());
        d
    })
}

/// Incremental SPDY/3 frame decoder for one direction, with that direction's zlib
/// context for header blocks.
pub struct SpdyDecoder {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf` (cut off once per feed, as in [`WsDecoder`]).
    start: usize,
    inflate: Decompress,
    dictionary_set: bool,
    failed: bool,
}

impl std::fmt::Debug for SpdyDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdyDecoder")
            .field("buffered", &self.buf.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Default for SpdyDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SpdyDecoder {
    /// A decoder at the start of a session.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            inflate: Decompress::new(true),
            dictionary_set: false,
            failed: false,
        }
    }

    /// Whether the bytes fed so far end exactly at a frame boundary.
    pub fn at_frame_boundary(&self) -> bool {
        self.buf.len() == self.start && !self.failed
    }

    /// Feeds bytes and returns every frame they complete.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<SpdyFrame>, FrameError> {
        if self.failed {
            return Err(FrameError::Stopped);
        }
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            match self.next_frame() {
                Ok(Some(f)) => out.push(f),
                Ok(None) => {
                    self.buf.drain(..self.start);
                    self.start = 0;
                    return Ok(out);
                }
                Err(e) => {
                    self.failed = true;
                    self.buf = Vec::new();
                    self.start = 0;
                    return Err(e);
                }
            }
        }
    }

    fn next_frame(&mut self) -> Result<Option<SpdyFrame>, FrameError> {
        let b = &self.buf[self.start..];
        if b.len() < 8 {
            return Ok(None);
        }
        let flags = b[4];
        let len = (usize::from(b[5]) << 16) | (usize::from(b[6]) << 8) | usize::from(b[7]);
        if b.len() < 8 + len {
            return Ok(None);
        }
        let body: Vec<u8> = b[8..8 + len].to_vec();
        let control = b[0] & 0x80 != 0;
        let word = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        self.start += 8 + len;
        if !control {
            return Ok(Some(SpdyFrame::Data {
                id: word & 0x7fff_ffff,
                flags,
                payload: body,
            }));
        }
        let version = (word >> 16) & 0x7fff;
        if version != 3 {
            return Err(FrameError::Spdy(format!("unsupported version {version}")));
        }
        let kind = (word & 0xffff) as u16;
        let u32_at = |at: usize| -> Result<u32, FrameError> {
            body.get(at..at + 4)
                .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
                .ok_or_else(|| {
                    FrameError::Spdy(format!("control frame type {kind} too short ({len} bytes)"))
                })
        };
        use spdy_type::*;
        let frame = match kind {
            SYN_STREAM => {
                let id = u32_at(0)? & 0x7fff_ffff;
                let associated = u32_at(4)? & 0x7fff_ffff;
                let headers = self.headers(body.get(10..).unwrap_or_default())?;
                SpdyFrame::SynStream {
                    id,
                    associated,
                    flags,
                    headers,
                }
            }
            SYN_REPLY | HEADERS => {
                let id = u32_at(0)? & 0x7fff_ffff;
                let headers = self.headers(body.get(4..).unwrap_or_default())?;
                if kind == SYN_REPLY {
                    SpdyFrame::SynReply { id, flags, headers }
                } else {
                    SpdyFrame::Headers { id, flags, headers }
                }
            }
            RST_STREAM => SpdyFrame::RstStream {
                id: u32_at(0)? & 0x7fff_ffff,
                status: u32_at(4)?,
            },
            PING => SpdyFrame::Ping(u32_at(0)?),
            GOAWAY => SpdyFrame::GoAway {
                last_good: u32_at(0)? & 0x7fff_ffff,
                status: u32_at(4).unwrap_or(0),
            },
            other => SpdyFrame::OtherControl { kind: other },
        };
        Ok(Some(frame))
    }

    /// Inflates one header block with the session's shared zlib context and parses it.
    fn headers(&mut self, compressed: &[u8]) -> Result<SpdyHeaders, FrameError> {
        // Sized for the usual ratio, never beyond the bound checked below: a large frame
        // must not reserve memory before it is known to inflate within it.
        let mut plain: Vec<u8> =
            Vec::with_capacity((compressed.len() * 4 + 64).min(MAX_HEADER_BLOCK + 1024));
        let mut input = compressed;
        loop {
            if plain.capacity() - plain.len() < 256 {
                plain.reserve(plain.capacity().max(1024));
            }
            if plain.len() > MAX_HEADER_BLOCK {
                return Err(FrameError::HeaderBlock(format!(
                    "more than {MAX_HEADER_BLOCK} bytes after inflating"
                )));
            }
            let before_in = self.inflate.total_in();
            let before_out = self.inflate.total_out();
            match self
                .inflate
                .decompress_vec(input, &mut plain, FlushDecompress::Sync)
            {
                Ok(status) => {
                    let consumed = (self.inflate.total_in() - before_in) as usize;
                    input = &input[consumed..];
                    let produced = self.inflate.total_out() - before_out;
                    if input.is_empty() && plain.capacity() > plain.len() {
                        break;
                    }
                    if status == Status::StreamEnd {
                        return Err(FrameError::HeaderBlock(
                            "the zlib stream ended (peer closed its compressor)".into(),
                        ));
                    }
                    if consumed == 0 && produced == 0 && plain.capacity() > plain.len() {
                        break;
                    }
                }
                Err(e) if e.needs_dictionary().is_some() && !self.dictionary_set => {
                    let consumed = (self.inflate.total_in() - before_in) as usize;
                    input = &input[consumed..];
                    self.inflate
                        .set_dictionary(spdy_dictionary())
                        .map_err(|e| FrameError::HeaderBlock(format!("set dictionary: {e}")))?;
                    self.dictionary_set = true;
                }
                Err(e) => return Err(FrameError::HeaderBlock(e.to_string())),
            }
        }
        parse_header_block(&plain)
    }
}

/// Parses an inflated SPDY/3 header block.
pub fn parse_header_block(plain: &[u8]) -> Result<SpdyHeaders, FrameError> {
    let mut pos = 0usize;
    let take_u32 = |pos: &mut usize| -> Result<usize, FrameError> {
        let s = plain
            .get(*pos..*pos + 4)
            .ok_or_else(|| FrameError::HeaderBlock("truncated length".into()))?;
        *pos += 4;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
    };
    let count = take_u32(&mut pos)?;
    if count > plain.len() / 8 + 1 {
        return Err(FrameError::HeaderBlock(format!(
            "{count} headers announced in a {}-byte block",
            plain.len()
        )));
    }
    let mut headers = Vec::with_capacity(count);
    for i in 0..count {
        let text = |pos: &mut usize| -> Result<String, FrameError> {
            let n = take_u32(pos)?;
            let s = plain.get(*pos..*pos + n).ok_or_else(|| {
                FrameError::HeaderBlock(format!("header {i}: length {n} past the end"))
            })?;
            *pos += n;
            Ok(String::from_utf8_lossy(s).into_owned())
        };
        let name = text(&mut pos)?;
        let value = text(&mut pos)?;
        headers.push((name.to_ascii_lowercase(), value));
    }
    Ok(headers)
}

/// The head of one WebSocket frame (RFC 6455 §5.2), as far as both the frame tap and the
/// output masker need it.
#[derive(Debug, Clone, Copy)]
pub(super) struct WsHead {
    /// FIN bit.
    pub(super) fin: bool,
    /// Opcode.
    pub(super) opcode: u8,
    /// The masking key of a client frame.
    pub(super) mask: Option<[u8; 4]>,
    /// Bytes before the payload.
    pub(super) header_len: usize,
    /// Payload bytes.
    pub(super) payload_len: usize,
}

impl WsHead {
    /// Parses the head at the start of `b`: `None` until it is complete; an error for
    /// reserved bits (an extension the relay did not negotiate) or a frame over
    /// [`MAX_WS_MESSAGE`].
    pub(super) fn parse(b: &[u8]) -> Result<Option<WsHead>, FrameError> {
        if b.len() < 2 {
            return Ok(None);
        }
        if b[0] & 0x70 != 0 {
            return Err(FrameError::WebSocket(
                "reserved bits set (a negotiated extension such as permessage-deflate?)".into(),
            ));
        }
        let (len, mut header_len) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(l), 10)
            }
            126 | 127 => return Ok(None),
            n => (u64::from(n), 2),
        };
        if len > MAX_WS_MESSAGE as u64 {
            return Err(FrameError::WebSocket(format!(
                "frame of {len} bytes exceeds the {MAX_WS_MESSAGE}-byte limit"
            )));
        }
        let mask = if b[1] & 0x80 != 0 {
            let Some(k) = b.get(header_len..header_len + 4) else {
                return Ok(None);
            };
            header_len += 4;
            Some([k[0], k[1], k[2], k[3]])
        } else {
            None
        };
        Ok(Some(WsHead {
            fin: b[0] & 0x80 != 0,
            opcode: b[0] & 0x0f,
            mask,
            header_len,
            payload_len: len as usize,
        }))
    }
}

#[cfg(test)]
#[path = "frames_tests.rs"]
mod tests;
