//! Stdin line rules on an allowed exec or attach stream (`exec.stdinLines`).
//!
//! The stream tap hands this guard the stdin payloads the client sends (WebSocket
//! `channel.k8s.io` channel 0, or the SPDY stream whose type is `stdin`). When a completed
//! line matches a rule, the relay drops the chunk that completed it (so the process never
//! receives that line's end), stops forwarding to the API server and closes the upstream
//! connection (the API server ends the session: the process's stdin closes, so a shell
//! reading it exits, but a process that does not read stdin may run on), and closes the
//! client side with frames of
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
        // As the API server reads them (and the policy did): the first value decides, and
        // anything but `0` or `false` is true.
        let flag = |name: &str| crate::request::query_bool(query.unwrap_or(""), name);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{
        frames::WsDecoder,
        upgrade::{Direction, StreamTap},
    };

    fn rules() -> Arc<StdinLineRules> {
        let policy = crate::policy::Policy::from_yaml(
            "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: shells\n    action: allow\n    verbs: [create, get]\n    resources: [pods/exec]\n    exec: {stdinLines: {deny: ['rm\\s+-rf']}}\n",
            "t.yaml",
        )
        .expect("policy");
        let uri: http::Uri = "/api/v1/namespaces/d/pods/p/exec?command=sh&stdin=true&tty=true"
            .parse()
            .expect("uri");
        let info = crate::request::RequestInfo::parse(&http::Method::POST, &uri).expect("info");
        let exec = crate::request::ExecRequest::from_uri(&uri);
        crate::policy::decide(
            &policy,
            &crate::policy::RequestContext::new(&info).with_exec(Some(&exec), false),
        )
        .stdin_lines
        .expect("line rules")
    }

    fn stdin_message(text: &str) -> Vec<u8> {
        let mut payload = b"0".to_vec();
        payload.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(text)
                .as_bytes(),
        );
        ws_encode(WsOpcode::Text, &payload, Some([1, 2, 3, 4]))
    }

    /// The base64 WebSocket protocol with a tty (no stderr stream): typed keystrokes are
    /// edited, a matching line is held back and the client gets the reason on stdout and a
    /// Failure Status on the error channel, then a Close.
    #[test]
    fn a_tty_session_over_base64_websocket_is_closed_on_a_matching_line() {
        let framing = TapFraming::WebSocketChannels {
            base64: true,
            ports: None,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_static("base64.v4.channel.k8s.io"),
        );
        let shape = SessionShape::new(Some("command=sh&stdin=true&tty=true&stdout=true"), &headers);
        assert_eq!(
            shape,
            SessionShape {
                tty: true,
                stderr: false,
                status_json: true
            }
        );
        let mut tap = StreamTap::new("a", framing, None)
            .with_stdin_lines(rules(), shape)
            .expect("readable stdin");
        // Typed one key at a time, with a typo fixed: nothing matches until Enter.
        for key in ["r", "m", " ", "-", "r", "x", "\x7f", "f", " ", "/"] {
            tap.pass(Direction::ToServer, &stdin_message(key))
                .expect("passes");
            assert_eq!(tap.stdin_violation(), None, "after {key:?}");
        }
        tap.pass(Direction::ToServer, &stdin_message("\r"))
            .expect("passes");
        let why = tap.stdin_violation().expect("the line matched").to_owned();
        assert!(
            why.contains("rule \"shells\"") && why.contains("stdinLines.deny[0]"),
            "{why}"
        );
        assert_eq!(tap.closing_frames(Direction::ToServer), None);
        let frames = tap.closing_frames(Direction::ToClient).expect("frames");
        let messages = WsDecoder::new().feed(&frames).expect("valid frames");
        assert_eq!(messages.len(), 3, "{messages:?}");
        let decode = |m: &crate::proxy::frames::WsMessage| {
            assert_eq!(m.opcode, WsOpcode::Text);
            (
                m.payload[0],
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(&m.payload[1..])
                        .expect("base64"),
                )
                .expect("utf-8"),
            )
        };
        let (channel, text) = decode(&messages[0]);
        assert_eq!(channel, b'1', "stdout: a tty session has no stderr");
        assert_eq!(text, format!("\r\nchaperone: {why}\r\n"));
        let (channel, status) = decode(&messages[1]);
        assert_eq!(channel, b'3');
        let status: serde_json::Value = serde_json::from_str(&status).expect("a Status");
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["reason"], "Forbidden");
        assert_eq!(messages[2].opcode, WsOpcode::Close);
    }

    /// A masked client frame with any FIN bit and opcode (the payload is short).
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [9, 8, 7, 6];
        let mut frame = vec![
            if fin { 0x80 } else { 0 } | opcode,
            0x80 | u8::try_from(payload.len()).expect("short"),
        ];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    fn guarded(framing: TapFraming, protocol: &'static str) -> StreamTap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_static(protocol),
        );
        let shape = SessionShape::new(Some("command=sh&stdin=true&stdout=true"), &headers);
        StreamTap::new("a", framing, None)
            .with_stdin_lines(rules(), shape)
            .expect("readable stdin")
    }

    /// The tap reads the client's frames as the API server does, so stdin cannot be framed
    /// past the line rules: `x/net/websocket` (behind `wsstream`) takes every frame on its
    /// own, a continuation frame included, and a text frame like a binary one.
    #[test]
    fn stdin_is_checked_however_the_client_frames_it() {
        let channels = TapFraming::WebSocketChannels {
            base64: false,
            ports: None,
        };
        let cases: [(&str, Vec<u8>); 3] = [
            (
                // Reassembled, this is one stdout message; the server writes the second
                // frame to stdin.
                "a fragmented message",
                [
                    client_frame(false, 0x2, b"\x01x"),
                    client_frame(true, 0x0, b"\x00rm -rf /\n"),
                ]
                .concat(),
            ),
            (
                "a text frame on a binary protocol",
                client_frame(true, 0x1, b"\x00rm -rf /\n"),
            ),
            (
                "a continuation after a whole message",
                [
                    client_frame(true, 0x2, b"\x00ls\n"),
                    client_frame(true, 0x0, b"\x00rm -rf /\n"),
                ]
                .concat(),
            ),
        ];
        for (what, bytes) in cases {
            let mut tap = guarded(channels.clone(), "v5.channel.k8s.io");
            let _ = tap.pass(Direction::ToServer, &bytes);
            assert!(tap.stdin_violation().is_some(), "{what}: not caught");
        }
        // The same frames with a harmless line pass.
        let mut tap = guarded(channels, "v5.channel.k8s.io");
        tap.pass(
            Direction::ToServer,
            &[
                client_frame(false, 0x2, b"\x01x"),
                client_frame(true, 0x0, b"\x00ls /\n"),
            ]
            .concat(),
        )
        .expect("passes");
        assert_eq!(tap.stdin_violation(), None);
    }

    /// spdystream refuses a SYN_STREAM whose id is not above every id opened before and
    /// keeps the stream: a second SYN_STREAM for the stdin stream, calling it stdout, does
    /// not make what follows on it unchecked.
    #[test]
    fn a_repeated_spdy_stream_id_keeps_its_first_type() {
        use chaperone_testkit::spdy_frames::SpdyEncoder;
        let mut tap = guarded(TapFraming::Spdy, "v4.channel.k8s.io");
        let mut client = SpdyEncoder::new().expect("encoder");
        let mut up = Vec::new();
        for (id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout"), (3, "stdout")] {
            up.extend(
                client
                    .syn_stream(id, 0, &[("streamtype", kind)])
                    .expect("syn"),
            );
        }
        up.extend(SpdyEncoder::data(3, b"rm -rf /\n", false));
        let _ = tap.pass(Direction::ToServer, &up);
        assert!(
            tap.stdin_violation().is_some(),
            "stdin relabelled as stdout"
        );
    }

    /// The guard replays line editing exactly when the API server allocates a tty: the
    /// first `tty` decides, and any value but `0` or `false` is true (`tty=yes` too).
    #[test]
    fn the_session_shape_reads_tty_as_the_api_server_does() {
        let headers = HeaderMap::new();
        for (query, tty, stderr) in [
            ("command=sh&stdin=true&tty=yes", true, false),
            ("command=sh&stdin=true&tty=TRUE&stderr=", true, true),
            ("command=sh&stdin=true&tty=false&tty=true", false, false),
            ("command=sh&stdin=true&tty=true&tty=false", true, false),
            (
                "command=sh&stdin=true&tty=0&stderr=false&stderr=true",
                false,
                false,
            ),
        ] {
            let shape = SessionShape::new(Some(query), &headers);
            assert_eq!((shape.tty, shape.stderr), (tty, stderr), "{query}");
        }
    }

    #[test]
    fn port_forward_and_opaque_streams_cannot_carry_line_rules() {
        for framing in [
            TapFraming::Opaque,
            TapFraming::WebSocketSpdyTunnel,
            TapFraming::WebSocketChannels {
                base64: false,
                ports: Some(vec![80]),
            },
        ] {
            assert!(StdinGuard::new(rules(), &framing, SessionShape::default()).is_err());
        }
        // Before v4 the error channel carries text, not a Status.
        let shape = SessionShape::new(None, &HeaderMap::new());
        assert!(!shape.status_json);
    }
}
