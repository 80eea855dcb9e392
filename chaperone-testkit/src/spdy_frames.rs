//! SPDY/3.1 frame encoder, the counterpart of the gateway's decoder, for tests that act as
//! the client or the API server of an exec, attach or port-forward stream.

use flate2::{Compress, Compression, FlushCompress};
use gateway_userspace::proxy::frames::{FrameError, SPDY_FLAG_FIN, spdy_dictionary, spdy_type};

/// Serialises a header block before compression.
pub fn build_header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// SPDY/3 frame encoder for one direction, with that direction's zlib context.
pub struct SpdyEncoder {
    deflate: Compress,
}

impl std::fmt::Debug for SpdyEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdyEncoder").finish_non_exhaustive()
    }
}

impl SpdyEncoder {
    /// An encoder at the start of a session, its compressor primed with the dictionary.
    pub fn new() -> Result<Self, FrameError> {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(spdy_dictionary())
            .map_err(|e| FrameError::HeaderBlock(format!("set dictionary: {e}")))?;
        Ok(Self { deflate })
    }

    fn compress(&mut self, headers: &[(&str, &str)]) -> Result<Vec<u8>, FrameError> {
        let plain = build_header_block(headers);
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = &plain[..];
        loop {
            out.reserve(256);
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| FrameError::HeaderBlock(e.to_string()))?;
            input = &input[(self.deflate.total_in() - before) as usize..];
            // A sync flush is complete when input is consumed and output space remains.
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + body.len());
        out.extend_from_slice(&[0x80, 0x03]);
        out.extend_from_slice(&kind.to_be_bytes());
        out.push(flags);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(body);
        out
    }

    /// SYN_STREAM (used by tests acting as the client).
    pub fn syn_stream(
        &mut self,
        id: u32,
        flags: u8,
        headers: &[(&str, &str)],
    ) -> Result<Vec<u8>, FrameError> {
        let mut body = Vec::new();
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&self.compress(headers)?);
        Ok(Self::control(spdy_type::SYN_STREAM, flags, &body))
    }

    /// SYN_REPLY.
    pub fn syn_reply(
        &mut self,
        id: u32,
        flags: u8,
        headers: &[(&str, &str)],
    ) -> Result<Vec<u8>, FrameError> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&self.compress(headers)?);
        Ok(Self::control(spdy_type::SYN_REPLY, flags, &body))
    }

    /// PING.
    pub fn ping(id: u32) -> Vec<u8> {
        Self::control(spdy_type::PING, 0, &id.to_be_bytes())
    }

    /// GOAWAY with status OK.
    pub fn goaway(last_good: u32) -> Vec<u8> {
        let mut body = last_good.to_be_bytes().to_vec();
        body.extend_from_slice(&0u32.to_be_bytes());
        Self::control(spdy_type::GOAWAY, 0, &body)
    }

    /// RST_STREAM.
    pub fn rst_stream(id: u32, status: u32) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&status.to_be_bytes());
        Self::control(spdy_type::RST_STREAM, 0, &body)
    }

    /// DATA frames for `payload` (split at the 24-bit length limit; an empty payload with
    /// `fin` is the half-close).
    pub fn data(id: u32, payload: &[u8], fin: bool) -> Vec<u8> {
        const MAX: usize = 0x00ff_ffff;
        let mut out = Vec::with_capacity(payload.len() + 8);
        let mut chunks: Vec<&[u8]> = payload.chunks(MAX).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (i, c) in chunks.into_iter().enumerate() {
            out.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
            out.push(if fin && i == last { SPDY_FLAG_FIN } else { 0 });
            out.extend_from_slice(&(c.len() as u32).to_be_bytes()[1..]);
            out.extend_from_slice(c);
        }
        out
    }
}
