//! Masking of byte streams that never end: `pods/log` responses (`kubectl logs -f`) and the
//! stdout/stderr channels of exec and attach sessions.
//!
//! [`LineMasker`] masks line by line as bytes arrive. Complete lines are masked and handed
//! on at once; the partial line after the last newline is held, so a credential cut in two
//! by the transport is whole again when it is masked. What is held is bounded: past
//! `max_line` bytes the held text is masked and emitted (cut at its last blank when there
//! is one in the newer half, so a token is rarely split), and the caller flushes it after
//! a delay ([`Hold`]) so a prompt without a newline still shows.
//!
//! A PEM private key spans lines. Rather than holding lines until its END line, the masker
//! replaces the BEGIN line (from the marker on) with `**masked:pem-private-key**` and then
//! drops every following line up to and including the END line: nothing is held, and a
//! key split over any number of chunks, frames or flushes is still removed. A BEGIN line
//! with no END within [`PEM_MAX_BLOCK`] bytes ends the block there (a stray BEGIN line must
//! not swallow the rest of a log).
//!
//! The maskers work on bytes: output that is not UTF-8 (binary files through `exec cat`)
//! passes with every byte outside a found credential unchanged.

use std::time::{Duration, Instant};

use super::detect::{Detectors, Hits, add_hits, total_hits};

/// Largest PEM block suppressed after a BEGIN line before the masker gives up on its END
/// (an RSA-16384 PKCS#8 key is about 13 KiB of PEM).
pub const PEM_MAX_BLOCK: usize = 64 * 1024;

/// How long and how much a stream masker may hold back before it must emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// Largest partial line held (the `max_line` of [`LineMasker`]).
    pub max_bytes: usize,
    /// Longest a partial line is held before it is masked and sent as it is.
    pub max_delay: Duration,
}

/// `pods/log`: 64 KiB and 250 ms (log lines end with a newline; the delay only matters for
/// the last line of a container that has not finished it).
pub const LOG_HOLD: Hold = Hold {
    max_bytes: 64 * 1024,
    max_delay: Duration::from_millis(250),
};

/// exec/attach stdout and stderr: 16 KiB and 20 ms, short enough that an echoed keystroke
/// or a prompt is not noticeably late.
pub const EXEC_HOLD: Hold = Hold {
    max_bytes: 16 * 1024,
    max_delay: Duration::from_millis(20),
};

/// Masks a byte stream line by line (see the module docs).
#[derive(Debug)]
pub struct LineMasker {
    detectors: Detectors,
    max_line: usize,
    pending: Vec<u8>,
    /// Inside a PEM block: how many bytes were dropped so far.
    in_pem: Option<usize>,
    /// When the oldest held byte arrived.
    held_since: Option<Instant>,
    hits: Vec<Hits>,
}

impl LineMasker {
    /// A masker at the start of a stream that holds at most `max_line` bytes of a partial
    /// line.
    pub fn new(detectors: Detectors, max_line: usize) -> Self {
        Self {
            detectors,
            max_line: max_line.max(1),
            pending: Vec::new(),
            in_pem: None,
            held_since: None,
            hits: Vec::new(),
        }
    }

    /// Feeds bytes; appends to `out` what may be sent now (complete lines, masked).
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        match memchr::memrchr(b'\n', data) {
            None => self.pending.extend_from_slice(data),
            Some(last) => {
                let (lines, rest) = data.split_at(last + 1);
                if self.pending.is_empty() {
                    self.text(lines, out);
                } else {
                    let mut held = std::mem::take(&mut self.pending);
                    held.extend_from_slice(lines);
                    self.text(&held, out);
                    held.clear();
                    self.pending = held;
                }
                self.pending.extend_from_slice(rest);
                self.held_since = None;
            }
        }
        if self.pending.len() > self.max_line {
            self.cut(out);
        }
        if self.pending.is_empty() {
            self.held_since = None;
        } else if self.held_since.is_none() {
            self.held_since = Some(Instant::now());
        }
    }

    /// Masks and appends everything held (end of stream, or held for too long).
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        let held = std::mem::take(&mut self.pending);
        self.text(&held, out);
        self.held_since = None;
    }

    /// Bytes of a partial line held back.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// When the held bytes must be flushed, given the longest `delay` they may wait.
    pub fn deadline(&self, delay: Duration) -> Option<Instant> {
        self.held_since.map(|t| t + delay)
    }

    /// What was masked so far, per detector.
    pub fn hits(&self) -> &[Hits] {
        &self.hits
    }

    /// How many values were masked so far.
    pub fn masked(&self) -> u64 {
        total_hits(&self.hits)
    }

    /// Emits a too-long partial line, keeping what follows its last blank when that is in
    /// the newer half (a token is then not cut in two).
    fn cut(&mut self, out: &mut Vec<u8>) {
        let held = std::mem::take(&mut self.pending);
        let keep_from = match memchr::memrchr3(b' ', b'\t', b'\r', &held) {
            Some(i) if held.len() - (i + 1) <= self.max_line / 2 => i + 1,
            _ => held.len(),
        };
        self.text(&held[..keep_from], out);
        self.pending = held[keep_from..].to_vec();
    }

    /// Masks `text` (whole lines, except maybe the last) into `out`.
    fn text(&mut self, text: &[u8], out: &mut Vec<u8>) {
        if text.is_empty() {
            return;
        }
        let detectors = self.detectors.clone();
        let pem_possible = detectors.pem().is_some()
            && (self.in_pem.is_some() || memchr::memmem::find(text, b"PRIVATE KEY").is_some());
        if !pem_possible {
            out.extend_from_slice(&detectors.redact_bytes(text, &mut self.hits));
            return;
        }
        // Lines outside PEM blocks are masked in runs, so the common case stays one call.
        let mut run = 0;
        let mut pos = 0;
        while pos < text.len() {
            let end = memchr::memchr(b'\n', &text[pos..]).map_or(text.len(), |i| pos + i + 1);
            let line = &text[pos..end];
            let begins = detectors.pem().and_then(|p| p.begin(line)).is_some();
            if self.in_pem.is_some() || begins {
                out.extend_from_slice(&detectors.redact_bytes(&text[run..pos], &mut self.hits));
                self.pem_line(&detectors, line, out);
                run = end;
            }
            pos = end;
        }
        out.extend_from_slice(&detectors.redact_bytes(&text[run..], &mut self.hits));
    }

    /// One line (or partial line) that starts, continues or ends a PEM block.
    fn pem_line(&mut self, detectors: &Detectors, line: &[u8], out: &mut Vec<u8>) {
        let Some(pem) = detectors.pem() else {
            out.extend_from_slice(&detectors.redact_bytes(line, &mut self.hits));
            return;
        };
        let line = match self.in_pem {
            Some(dropped) => match pem.end(line) {
                Some(end) => {
                    self.in_pem = None;
                    &line[end..]
                }
                None => {
                    let dropped = dropped + line.len();
                    if dropped > PEM_MAX_BLOCK {
                        // No END in sight: end the marker's line and stop dropping.
                        self.in_pem = None;
                        out.push(b'\n');
                    } else {
                        self.in_pem = Some(dropped);
                    }
                    return;
                }
            },
            None => line,
        };
        match pem.begin(line) {
            // BEGIN and END on one line (an escaped key in JSON) are one match for the
            // detectors; only a block left open goes on to the next lines.
            Some((start, end)) if pem.end(&line[end..]).is_none() => {
                out.extend_from_slice(&detectors.redact_bytes(&line[..start], &mut self.hits));
                out.extend_from_slice(pem.marker());
                add_hits(&mut self.hits, super::detect::PEM_ID, 1);
                self.in_pem = Some(line.len() - start);
            }
            _ => out.extend_from_slice(&detectors.redact_bytes(line, &mut self.hits)),
        }
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
