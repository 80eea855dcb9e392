//! Masking of exec/attach output on its way to the client.
//!
//! Unlike the passive tap, this rewrites the API server's bytes: it splits them into
//! frames (WebSocket `channel.k8s.io` messages, or SPDY/3.1 frames), masks the payloads of
//! the stdout and stderr channels with one [`LineMasker`] per channel, and frames the
//! result again with its new length. Everything else (stdin never comes this way; the
//! error and close channels, control frames, SPDY header blocks, which share one zlib
//! context and so must not be re-encoded) is copied byte for byte.
//!
//! Each channel's masker holds at most a partial line ([`EXEC_HOLD`]: 16 KiB) back; the
//! relay flushes it once it is 20 ms old, and before any frame that is not stdout or stderr
//! data (the exit status, a close), so output is never reordered with the stream's end.
//! A stream whose frames cannot be parsed is ended rather than passed unmasked.

use std::{borrow::Cow, collections::HashMap, time::Instant};

use base64::Engine as _;

use crate::masking::{
    detect::Detectors,
    stream::{EXEC_HOLD, LineMasker},
};

use super::{
    frames::{FrameError, MAX_WS_MESSAGE, SPDY_FLAG_FIN, WsHead, WsOpcode, spdy_type, ws_encode},
    upgrade::StreamChannel,
};

/// Largest SPDY data frame payload (24-bit length).
const MAX_SPDY_DATA: usize = 0x00ff_ffff;

/// How the bytes to the client are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OutputFraming {
    /// WebSocket `channel.k8s.io` (v1 to v5); `base64` for the base64 variants.
    WebSocket {
        /// Text messages with an ASCII channel digit and base64 payloads.
        base64: bool,
    },
    /// SPDY/3.1 with one stream per channel.
    Spdy,
}

#[derive(Debug)]
struct Channel {
    masker: LineMasker,
    /// The SPDY stream the channel's data arrives on (where held bytes are sent).
    spdy_id: Option<u32>,
}

/// Rewrites the to-client direction of an exec or attach stream (see the module docs).
#[derive(Debug)]
pub(super) struct OutputMasker {
    framing: OutputFraming,
    /// Bytes of a frame not complete yet.
    buf: Vec<u8>,
    /// A fragmented WebSocket data message being reassembled (opcode, payload).
    fragments: Option<(u8, Vec<u8>)>,
    /// stdout, stderr.
    channels: [Channel; 2],
    failed: bool,
}

impl OutputMasker {
    pub(super) fn new(framing: OutputFraming, detectors: &Detectors) -> Self {
        let channel = || Channel {
            masker: LineMasker::new(detectors.clone(), EXEC_HOLD.max_bytes),
            spdy_id: None,
        };
        Self {
            framing,
            buf: Vec::new(),
            fragments: None,
            channels: [channel(), channel()],
            failed: false,
        }
    }

    /// Rewrites bytes from the API server into `out`; `spdy_streams` names the SPDY streams
    /// the client opened. After an error the stream must be ended.
    pub(super) fn feed(
        &mut self,
        data: &[u8],
        spdy_streams: &HashMap<u32, StreamChannel>,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        if self.failed {
            return Err(FrameError::Stopped);
        }
        let mut buf = std::mem::take(&mut self.buf);
        let input: &[u8] = if buf.is_empty() {
            data
        } else {
            buf.extend_from_slice(data);
            &buf
        };
        let parsed = match self.framing {
            OutputFraming::WebSocket { base64 } => self.websocket(input, base64, out),
            OutputFraming::Spdy => self.spdy(input, spdy_streams, out),
        };
        match parsed {
            Ok(used) => {
                self.buf = input[used..].to_vec();
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Sends what the channels hold (their time is up, or the stream ends).
    pub(super) fn flush(&mut self, out: &mut Vec<u8>) {
        match self.framing {
            OutputFraming::WebSocket { base64 } => self.flush_websocket(base64, out),
            OutputFraming::Spdy => self.flush_spdy(out),
        }
    }

    /// When held output must be flushed.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.channels
            .iter()
            .filter_map(|c| c.masker.deadline(EXEC_HOLD.max_delay))
            .min()
    }

    /// Values masked so far.
    pub(super) fn masked(&self) -> u64 {
        self.channels.iter().map(|c| c.masker.masked()).sum()
    }

    /// Parses whole WebSocket frames from `input`; returns the bytes consumed.
    fn websocket(
        &mut self,
        input: &[u8],
        base64: bool,
        out: &mut Vec<u8>,
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        loop {
            let b = &input[pos..];
            let Some(WsHead {
                fin,
                opcode,
                mask: key,
                header_len: header,
                payload_len: len,
            }) = WsHead::parse(b)?
            else {
                return Ok(pos);
            };
            if b.len() < header + len {
                return Ok(pos);
            }
            let raw = &b[..header + len];
            pos += header + len;
            let payload: Cow<'_, [u8]> = match key {
                None => Cow::Borrowed(&raw[header..]),
                Some(k) => Cow::Owned(
                    raw[header..]
                        .iter()
                        .enumerate()
                        .map(|(i, byte)| byte ^ k[i % 4])
                        .collect(),
                ),
            };
            match opcode {
                0x8 => {
                    self.flush_websocket(base64, out);
                    out.extend_from_slice(raw);
                }
                0x9 | 0xA => out.extend_from_slice(raw),
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
                        self.message(op, &acc, None, base64, out)?;
                    } else {
                        self.fragments = Some((op, acc));
                    }
                }
                0x1 | 0x2 => {
                    if self.fragments.is_some() {
                        return Err(FrameError::WebSocket(
                            "new data frame inside a fragmented message".into(),
                        ));
                    }
                    if fin {
                        // A masked frame from the server is re-encoded rather than copied.
                        let raw = (key.is_none()).then_some(raw);
                        self.message(opcode, &payload, raw, base64, out)?;
                    } else {
                        self.fragments = Some((opcode, payload.into_owned()));
                    }
                }
                op => {
                    return Err(FrameError::WebSocket(format!("unknown opcode 0x{op:x}")));
                }
            }
        }
    }

    /// One whole data message; `raw` is its original single frame, if it had one.
    fn message(
        &mut self,
        opcode: u8,
        payload: &[u8],
        raw: Option<&[u8]>,
        base64: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        let data_message = if base64 { opcode == 0x1 } else { opcode == 0x2 };
        let channel = payload
            .first()
            .map(|&c| if base64 { c.wrapping_sub(b'0') } else { c });
        match channel {
            Some(c @ (1 | 2)) if data_message && payload.len() > 1 => {
                let data: Cow<'_, [u8]> = if base64 {
                    Cow::Owned(
                        base64::engine::general_purpose::STANDARD
                            .decode(&payload[1..])
                            .map_err(|e| {
                                FrameError::WebSocket(format!("channel {c} is not base64: {e}"))
                            })?,
                    )
                } else {
                    Cow::Borrowed(&payload[1..])
                };
                let mut masked = Vec::with_capacity(data.len());
                self.channels[usize::from(c - 1)]
                    .masker
                    .push(&data, &mut masked);
                websocket_data(c, &masked, base64, out);
            }
            _ => {
                self.flush_websocket(base64, out);
                match raw {
                    Some(raw) => out.extend_from_slice(raw),
                    None => {
                        let op = if opcode == 0x1 {
                            WsOpcode::Text
                        } else {
                            WsOpcode::Binary
                        };
                        out.extend_from_slice(&ws_encode(op, payload, None));
                    }
                }
            }
        }
        Ok(())
    }

    fn flush_websocket(&mut self, base64: bool, out: &mut Vec<u8>) {
        for (i, channel) in self.channels.iter_mut().enumerate() {
            if channel.masker.pending() > 0 {
                let mut held = Vec::new();
                channel.masker.flush(&mut held);
                websocket_data(i as u8 + 1, &held, base64, out);
            }
        }
    }

    /// Parses whole SPDY frames from `input`; returns the bytes consumed.
    fn spdy(
        &mut self,
        input: &[u8],
        streams: &HashMap<u32, StreamChannel>,
        out: &mut Vec<u8>,
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        loop {
            let b = &input[pos..];
            if b.len() < 8 {
                return Ok(pos);
            }
            let len = (usize::from(b[5]) << 16) | (usize::from(b[6]) << 8) | usize::from(b[7]);
            if b.len() < 8 + len {
                return Ok(pos);
            }
            let raw = &b[..8 + len];
            pos += 8 + len;
            if b[0] & 0x80 != 0 {
                let kind = u16::from_be_bytes([b[2], b[3]]);
                if !matches!(
                    kind,
                    spdy_type::PING | spdy_type::WINDOW_UPDATE | spdy_type::SETTINGS
                ) {
                    // A reply, reset or goaway may end a stream: held output goes first.
                    self.flush_spdy(out);
                }
                out.extend_from_slice(raw);
                continue;
            }
            let id = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff;
            let fin = b[4] & SPDY_FLAG_FIN != 0;
            let channel = match streams.get(&id) {
                Some(StreamChannel::Stdout) => Some(0),
                Some(StreamChannel::Stderr) => Some(1),
                // Output on a stream whose type the tap did not read (it stopped decoding
                // the client's frames, or the client named the type in a way it does not
                // know) may be stdout to the client: fail closed rather than pass it on.
                None | Some(StreamChannel::Unknown(_)) => {
                    return Err(FrameError::Spdy(format!(
                        "output on stream {id}, whose type is not known, cannot be masked"
                    )));
                }
                _ => None,
            };
            match channel {
                Some(c) => {
                    let ch = &mut self.channels[c];
                    ch.spdy_id = Some(id);
                    let mut masked = Vec::with_capacity(len);
                    ch.masker.push(&raw[8..], &mut masked);
                    if fin {
                        ch.masker.flush(&mut masked);
                    }
                    spdy_data(id, fin, &masked, out);
                }
                None => {
                    self.flush_spdy(out);
                    out.extend_from_slice(raw);
                }
            }
        }
    }

    fn flush_spdy(&mut self, out: &mut Vec<u8>) {
        for channel in &mut self.channels {
            if let Some(id) = channel.spdy_id
                && channel.masker.pending() > 0
            {
                let mut held = Vec::new();
                channel.masker.flush(&mut held);
                spdy_data(id, false, &held, out);
            }
        }
    }
}

/// A `channel.k8s.io` data message on channel `c` (nothing when `data` is empty).
pub(super) fn websocket_data(c: u8, data: &[u8], base64: bool, out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    if base64 {
        let mut payload = vec![b'0' + c];
        payload.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(data)
                .as_bytes(),
        );
        out.extend_from_slice(&ws_encode(WsOpcode::Text, &payload, None));
    } else {
        let mut payload = Vec::with_capacity(data.len() + 1);
        payload.push(c);
        payload.extend_from_slice(data);
        out.extend_from_slice(&ws_encode(WsOpcode::Binary, &payload, None));
    }
}

/// SPDY data frames for `data` on stream `id` (a bare FIN when `data` is empty and `fin`).
pub(super) fn spdy_data(id: u32, fin: bool, data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        if fin {
            spdy_frame(id, SPDY_FLAG_FIN, &[], out);
        }
        return;
    }
    let mut chunks = data.chunks(MAX_SPDY_DATA).peekable();
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if fin && last { SPDY_FLAG_FIN } else { 0 };
        spdy_frame(id, flags, chunk, out);
    }
}

fn spdy_frame(id: u32, flags: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    out.push(flags);
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(payload);
}

#[cfg(test)]
#[path = "output_mask_tests.rs"]
mod tests;
