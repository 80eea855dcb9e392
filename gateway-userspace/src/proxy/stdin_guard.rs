//! Stdin line rules on an allowed exec or attach stream (`exec.stdinLines`).
//!
//! The stream tap hands this guard the stdin payloads the client sends (WebSocket
//! `channel.k8s.io` channel 0, or the SPDY stream whose type is `stdin`). When a completed
//! line matches a rule, the relay drops the chunk that completed it (so the process never
//! receives that line's end), stops forwarding to the API server and closes the upstream
//! connection (the API server ends the process), and closes the client side with frames of
//! the client's own protocol: the reason on stderr (stdout for a tty session, which has no
//! stderr stream), a `Failure` Status on the error channel (plain text before protocol
//! v4), then a WebSocket Close or SPDY FINs. kubectl prints the stderr text and
//! `error: <reason>` and exits 1. Bytes typed before the line's end were forwarded as
//! they came (see docs/policy-reference.md on why line rules are best effort).

use std::{collections::HashMap, sync::Arc};

use base64::Engine as _;
use http::HeaderMap;

use super::{
    frames::{WsOpcode, ws_encode},
    output_mask::{spdy_data, websocket_data},
    upgrade::{StreamChannel, TapFraming},
};
use crate::policy::{StdinLineRules, StdinLineWatcher};

/// The policy's stdin line rules for one stream, as a request extension from the decision
/// to the upgrade.
#[derive(Clone)]
pub(super) struct StdinLines(pub(super) Arc<StdinLineRules>);

/// What the client asked for, from the exec/attach query and the 101 response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SessionShape {
    /// `tty=true`: stdin is keystrokes, the line editing is replayed.
    pub(super) tty: bool,
    /// `stderr=true`: the client has a stderr stream (WebSocket channel 2).
    pub(super) stderr: bool,
    /// The error channel carries a JSON `Status` (protocol v4 and later).
    pub(super) status_json: bool,
}

impl SessionShape {
    /// Reads the flags from the request's query and the negotiated protocol.
    pub(super) fn new(query: Option<&str>, response: &HeaderMap) -> SessionShape {
        let flag = |name: &str| {
            url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .any(|(k, v)| k == name && matches!(v.as_ref(), "true" | "1" | "True"))
        };
        let protocol = [
            http::header::SEC_WEBSOCKET_PROTOCOL.as_str(),
            "x-stream-protocol-version",
        ]
        .iter()
        .find_map(|h| response.get(*h).and_then(|v| v.to_str().ok()))
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
        let status_json = ["v4.", "v5.", "base64.v4.", "base64.v5."]
            .iter()
            .any(|p| protocol.starts_with(p));
        SessionShape {
            tty: flag("tty"),
            stderr: flag("stderr"),
            status_json,
        }
    }
}

/// The per-stream state: the line assembler and, once a line matched, why the stream is
/// being closed.
#[derive(Debug)]
pub(super) struct StdinGuard {
    watcher: StdinLineWatcher,
    shape: SessionShape,
    closed: Option<String>,
}

impl StdinGuard {
    /// A guard for a stream framed `framing`; fails for framings whose stdin the gateway
    /// cannot read (the caller refuses the stream).
    pub(super) fn new(
        rules: Arc<StdinLineRules>,
        framing: &TapFraming,
        shape: SessionShape,
    ) -> Result<Self, String> {
        match framing {
            TapFraming::WebSocketChannels { ports: None, .. } | TapFraming::Spdy => {}
            other => {
                return Err(format!(
                    "the stream's framing ({other:?}) carries no stdin channel the gateway can read"
                ));
            }
        }
        Ok(Self {
            watcher: StdinLineWatcher::new(rules, shape.tty),
            shape,
            closed: None,
        })
    }

    /// Why the stream is being closed, once it is.
    pub(super) fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Stdin bytes from the client (already base64-decoded for the base64 protocols).
    pub(super) fn data(&mut self, payload: &[u8]) {
        if self.closed.is_none()
            && let Some(v) = self.watcher.push(payload)
        {
            self.closed = Some(v.reason());
        }
    }

    /// A base64 protocol's stdin payload.
    pub(super) fn base64_data(&mut self, payload: &[u8]) {
        match base64::engine::general_purpose::STANDARD.decode(payload) {
            Ok(plain) => self.data(&plain),
            Err(e) => self.fail(&format!("a stdin message is not base64: {e}")),
        }
    }

    /// The client closed stdin: a last line without a line end counts.
    pub(super) fn end(&mut self) {
        if self.closed.is_none()
            && let Some(v) = self.watcher.finish()
        {
            self.closed = Some(v.reason());
        }
    }

    /// Stdin can no longer be read (the tap stopped decoding): fail closed.
    pub(super) fn fail(&mut self, why: &str) {
        if self.closed.is_none() {
            self.closed = Some(format!(
                "stream closed by Chaperone: the policy checks the lines typed on stdin, and stdin could not be read ({why})"
            ));
        }
    }

    /// The frames that end the client side of a closed stream: the reason on stderr (or
    /// stdout), the error channel, then the end of the stream.
    pub(super) fn closing_frames(
        &self,
        framing: &TapFraming,
        spdy_streams: &HashMap<u32, StreamChannel>,
    ) -> Vec<u8> {
        let Some(reason) = &self.closed else {
            return Vec::new();
        };
        let eol = if self.shape.tty { "\r\n" } else { "\n" };
        let text = format!("{eol}chaperone: {reason}{eol}");
        let error = if self.shape.status_json {
            serde_json::json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": format!("chaperone: {reason}"),
                "reason": "Forbidden",
                "code": 403,
            })
            .to_string()
        } else {
            format!("chaperone: {reason}")
        };
        let mut out = Vec::new();
        match framing {
            TapFraming::WebSocketChannels { base64, .. } => {
                let channel = if self.shape.stderr { 2 } else { 1 };
                websocket_data(channel, text.as_bytes(), *base64, &mut out);
                websocket_data(3, error.as_bytes(), *base64, &mut out);
                let mut close = 1000u16.to_be_bytes().to_vec();
                close.extend_from_slice(b"closed by chaperone policy");
                out.extend_from_slice(&ws_encode(WsOpcode::Close, &close, None));
            }
            TapFraming::Spdy => {
                let find = |want: &StreamChannel| {
                    spdy_streams
                        .iter()
                        .filter(|(_, c)| *c == want)
                        .map(|(id, _)| *id)
                        .min()
                };
                let stdout = find(&StreamChannel::Stdout);
                let stderr = find(&StreamChannel::Stderr);
                if let Some(id) = stderr.or(stdout) {
                    spdy_data(id, false, text.as_bytes(), &mut out);
                }
                if let Some(id) = find(&StreamChannel::Error) {
                    spdy_data(id, true, error.as_bytes(), &mut out);
                }
                for id in [stdout, stderr].into_iter().flatten() {
                    spdy_data(id, true, &[], &mut out);
                }
            }
            _ => {}
        }
        out
    }
}
