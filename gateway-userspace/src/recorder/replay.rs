//! Playing an exec session back: the terminal output with its timing, the workload's
//! requests interleaved (`chaperone replay`), and asciicast v2 export (`chaperone
//! export --format asciicast`, which `asciinema play` plays).
//!
//! What is played is the output the agent's client received (stdout and stderr after
//! masking). Typed input is not played: a terminal session's remote pty echoes it in the
//! output already, and stdin of a non-tty session is data, not screen content.

use std::io::Write;
use std::time::Duration;

use super::exec_frames::{ExecFrameRecord, FrameEventKind};
use super::schema::RequestRecord;
use super::sessions::request_line;

/// One step of a replay, at `offset_us` from the start of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayEvent {
    /// Output the client was sent (stdout or stderr).
    Output {
        /// Microseconds since the session started.
        offset_us: i64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The terminal was resized.
    Resize {
        /// Microseconds since the session started.
        offset_us: i64,
        /// Columns.
        width: u16,
        /// Rows.
        height: u16,
    },
    /// A request of the same workload made while the session ran.
    Request {
        /// Microseconds since the session started.
        offset_us: i64,
        /// The request, one line.
        line: String,
    },
}

impl ReplayEvent {
    fn offset_us(&self) -> i64 {
        match self {
            ReplayEvent::Output { offset_us, .. }
            | ReplayEvent::Resize { offset_us, .. }
            | ReplayEvent::Request { offset_us, .. } => *offset_us,
        }
    }
}

/// Terminal size from a `resize` frame (`{"Width":80,"Height":24}`).
fn terminal_size(data: &[u8]) -> Option<(u16, u16)> {
    let v: serde_json::Value = serde_json::from_slice(data).ok()?;
    let width = u16::try_from(v.get("Width")?.as_u64()?).ok()?;
    let height = u16::try_from(v.get("Height")?.as_u64()?).ok()?;
    (width > 0 && height > 0).then_some((width, height))
}

/// The events of a session (its rows in `seq` order), with `requests` (made while it ran)
/// interleaved by time. `start` is when the session's stream started (its rows' time
/// minus their offset).
pub fn replay_events(frames: &[&ExecFrameRecord], requests: &[&RequestRecord]) -> Vec<ReplayEvent> {
    let mut events = Vec::new();
    let mut start: Option<jiff::Timestamp> = None;
    for f in frames {
        start.get_or_insert_with(|| {
            f.time
                .checked_sub(jiff::SignedDuration::from_micros(f.offset_us))
                .unwrap_or(f.time)
        });
        if f.event != FrameEventKind::Frame {
            continue;
        }
        let Some(data) = &f.data else { continue };
        match (f.direction, f.stream.as_deref()) {
            (Some("to_client"), Some("stdout" | "stderr")) => events.push(ReplayEvent::Output {
                offset_us: f.offset_us,
                data: data.clone(),
            }),
            (Some("to_server"), Some("resize")) => {
                if let Some((width, height)) = terminal_size(data) {
                    events.push(ReplayEvent::Resize {
                        offset_us: f.offset_us,
                        width,
                        height,
                    });
                }
            }
            _ => {}
        }
    }
    if let Some(start) = start {
        for r in requests {
            let offset = r.request_time.duration_since(start);
            events.push(ReplayEvent::Request {
                offset_us: i64::try_from(offset.as_micros()).unwrap_or(i64::MAX).max(0),
                line: request_line(r),
            });
        }
    }
    // Stable: output keeps its order, a request goes after output at the same instant.
    events.sort_by_key(ReplayEvent::offset_us);
    events
}

/// How to play.
#[derive(Debug, Clone, Copy)]
pub struct PlayOptions {
    /// Speed factor: 2.0 plays twice as fast.
    pub speed: f64,
    /// Print everything at once, without waiting.
    pub no_wait: bool,
    /// Longest pause played, however long the session was idle.
    pub max_pause: Duration,
}

/// Plays `events` to `out` with their timing; request lines go on their own line.
pub fn play(
    events: &[ReplayEvent],
    options: PlayOptions,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut previous = 0i64;
    for event in events {
        if !options.no_wait {
            let gap = event.offset_us().saturating_sub(previous).max(0);
            let pause = Duration::from_micros(u64::try_from(gap).unwrap_or(0))
                .div_f64(options.speed.max(f64::MIN_POSITIVE))
                .min(options.max_pause);
            if !pause.is_zero() {
                out.flush()?;
                std::thread::sleep(pause);
            }
        }
        previous = previous.max(event.offset_us());
        match event {
            ReplayEvent::Output { data, .. } => out.write_all(data)?,
            ReplayEvent::Resize { .. } => {}
            ReplayEvent::Request { line, .. } => write!(out, "\r\n{line}\r\n")?,
        }
    }
    out.flush()
}

/// Turns bytes into text for asciicast without splitting a UTF-8 character across events
/// (a frame may end inside one); invalid bytes become U+FFFD.
#[derive(Debug, Default)]
struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    fn push(&mut self, data: &[u8]) -> String {
        self.pending.extend_from_slice(data);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: keep it for the next frame.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{fffd}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// The session as an asciicast v2 document (header line, then one `[time, "o", text]`
/// line per output event and `[time, "r", "WxH"]` per resize). `title` goes in the header;
/// `timestamp` is the session's start.
pub fn asciicast(events: &[ReplayEvent], title: &str, timestamp: jiff::Timestamp) -> String {
    let (width, height) = events
        .iter()
        .find_map(|e| match e {
            ReplayEvent::Resize { width, height, .. } => Some((*width, *height)),
            _ => None,
        })
        .unwrap_or((80, 24));
    let header = serde_json::json!({
        "version": 2,
        "width": width,
        "height": height,
        "timestamp": timestamp.as_second(),
        "title": title,
        "env": {"TERM": "xterm-256color", "SHELL": "/bin/sh"},
    });
    let mut out = header.to_string();
    out.push('\n');
    let mut text = Utf8Chunker::default();
    let mut last = 0.0f64;
    let seconds = |offset_us: i64| offset_us as f64 / 1e6;
    for event in events {
        let line = match event {
            ReplayEvent::Output { offset_us, data } => {
                let chunk = text.push(data);
                if chunk.is_empty() {
                    continue;
                }
                last = seconds(*offset_us);
                serde_json::json!([last, "o", chunk])
            }
            ReplayEvent::Resize {
                offset_us,
                width,
                height,
            } => {
                last = seconds(*offset_us);
                serde_json::json!([last, "r", format!("{width}x{height}")])
            }
            ReplayEvent::Request { offset_us, line } => {
                last = seconds(*offset_us);
                serde_json::json!([last, "o", format!("\r\n{line}\r\n")])
            }
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    let rest = text.finish();
    if !rest.is_empty() {
        out.push_str(&serde_json::json!([last, "o", rest]).to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
#[path = "replay_tests.rs"]
mod tests;
