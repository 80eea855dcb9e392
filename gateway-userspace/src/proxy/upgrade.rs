//! Upgraded connections: `kubectl exec/attach/port-forward/cp` (WebSocket or SPDY/3.1).
//!
//! After the policy allows the request, it goes to the API server over a dedicated
//! HTTP/1.1 connection (TLS verified against the cluster CA, ALPN `http/1.1` only, the
//! gateway's token instead of the client's credentials) with its Upgrade, Connection,
//! `Sec-WebSocket-*` and `X-Stream-Protocol-Version` headers intact. A non-101 answer goes
//! back like any response; a 101 is relayed, then bytes flow both ways until both sides
//! are done. Each direction is tapped into a frame decoder ([`super::frames`]) whose
//! events feed counters and an optional [`FrameSink`]; a decoding error only stops the
//! decoding, never the relay. The request's row is written when the stream ends.
//!
//! When the output of an exec or attach session must be masked, the API server's bytes
//! are rewritten before they reach the client ([`super::output_mask`]) and the tap decodes
//! what the client is sent, so recorded frames hold the masked form only. Port-forward is
//! never masked: its bytes are another program's protocol (TLS, a database's wire format)
//! that masking would corrupt, and policy is the control for it.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use super::{
    BoxError, Proxy, ProxyBody,
    bodies::{CountingBody, Metered},
    handler::{Pending, StreamMasking, insert_audit_id, keep_or_insert_audit_id, upstream_uri},
    headers::{sanitize_request_headers, strip_hop_by_hop},
    limits::SlotHold,
    live::LiveStop,
    record::{RequestBytes, Row},
    stdin_guard::{SessionShape, StdinGuard, StdinLines},
};
use crate::{
    error_chain,
    masking::detect::Detectors,
    policy,
    proxy::frames::{
        FrameError, SpdyDecoder, SpdyFrame, WsDecoder, WsMessage, WsOpcode, spdy_header, ws_encode,
    },
    proxy::output_mask::{OutputFraming, OutputMasker},
    recorder::{Outcome, SessionKind, SessionRecorder},
    request::RequestInfo,
    status::Status,
};

/// Relay buffer per direction.
const RELAY_BUFFER: usize = 64 * 1024;

/// Which upgrade protocol a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeProtocol {
    /// `Upgrade: websocket`.
    WebSocket,
    /// `Upgrade: SPDY/3.1`.
    Spdy,
}

/// The upgrade protocol of an HTTP/1.1 request with `Connection: Upgrade`, if it is one
/// the gateway relays; other upgrade requests are forwarded as plain requests (with the
/// Upgrade header removed), as before.
pub fn upgrade_protocol<B>(req: &Request<B>) -> Option<UpgradeProtocol> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return None;
    }
    let upgrade = req.headers().get(header::UPGRADE)?.to_str().ok()?.trim();
    if upgrade.eq_ignore_ascii_case("websocket") {
        Some(UpgradeProtocol::WebSocket)
    } else if upgrade.eq_ignore_ascii_case("SPDY/3.1") {
        Some(UpgradeProtocol::Spdy)
    } else {
        None
    }
}

/// Whether the API server upgrades requests for this target: exec, attach and
/// port-forward on pods, and the proxy subresources (a WebSocket to a pod or service). The
/// gateway forwards an upgrade request for nothing else.
pub(super) fn upgrades(info: &RequestInfo) -> bool {
    info.is_resource_request
        && match info.subresource.as_str() {
            "exec" | "attach" | "portforward" => info.resource == "pods",
            "proxy" => true,
            _ => false,
        }
}

/// Why an upgrade the policy masks cannot be forwarded, if it cannot: exec and attach
/// output is masked on the stream and port-forward is never masked (see the module docs),
/// but a proxied WebSocket carries another program's protocol the gateway cannot mask.
pub(super) fn unmaskable(
    pending: &Pending,
    info: &RequestInfo,
    decision: &policy::Decision,
) -> Option<String> {
    let upgraded = matches!(pending, Pending::Upgrade(..));
    (upgraded
        && decision.masking.is_some()
        && !matches!(info.subresource.as_str(), "exec" | "attach" | "portforward"))
    .then(|| {
        format!(
            "the policy masks {}, and an upgraded {} stream cannot be masked",
            info.resource_with_subresource(),
            info.subresource
        )
    })
}

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// From the client (the agent) to the API server.
    ToServer,
    /// From the API server to the client.
    ToClient,
}

/// The logical stream a frame belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamChannel {
    /// The process's standard input.
    Stdin,
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// The error channel (the final Status).
    Error,
    /// Terminal resize events.
    Resize,
    /// A `channel.k8s.io` v5 CLOSE message.
    Close,
    /// Port-forward data for a remote port (`None` when the port is not known).
    PortForwardData(Option<u16>),
    /// Port-forward error text for a remote port.
    PortForwardError(Option<u16>),
    /// WebSocket ping/pong/close or SPDY control frames.
    Control,
    /// A channel or stream the tap does not know.
    Unknown(u32),
}

impl StreamChannel {
    /// Whether this is one of port-forward's streams (data or error).
    pub fn is_portforward(&self) -> bool {
        matches!(
            self,
            StreamChannel::PortForwardData(_) | StreamChannel::PortForwardError(_)
        )
    }

    /// A short name for logs and a later `exec_frames` table.
    pub fn name(&self) -> String {
        match self {
            StreamChannel::Stdin => "stdin".into(),
            StreamChannel::Stdout => "stdout".into(),
            StreamChannel::Stderr => "stderr".into(),
            StreamChannel::Error => "error".into(),
            StreamChannel::Resize => "resize".into(),
            StreamChannel::Close => "close".into(),
            StreamChannel::PortForwardData(Some(p)) => format!("portforward-data:{p}"),
            StreamChannel::PortForwardData(None) => "portforward-data".into(),
            StreamChannel::PortForwardError(Some(p)) => format!("portforward-error:{p}"),
            StreamChannel::PortForwardError(None) => "portforward-error".into(),
            StreamChannel::Control => "control".into(),
            StreamChannel::Unknown(n) => format!("unknown:{n}"),
        }
    }
}

/// One decoded frame of an upgraded stream.
#[derive(Debug, Clone, Copy)]
pub struct FrameEvent<'a> {
    /// The request's audit id (joins with the `requests` row).
    pub audit_id: &'a str,
    /// Which way it went.
    pub direction: Direction,
    /// The logical stream.
    pub channel: &'a StreamChannel,
    /// The payload without channel byte or framing.
    pub payload: &'a [u8],
}

/// Consumer of decoded frames (a later `exec_frames` table). Called inline on the relay
/// path: implementations must be quick and must not block.
pub trait FrameSink: Send + Sync {
    /// One decoded data frame.
    fn frame(&self, event: &FrameEvent<'_>);
    /// The stream ended; `stats` are its totals.
    fn finished(&self, _audit_id: &str, _stats: &StreamStats) {}
}

/// Totals for one upgraded stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Raw bytes client -> API server after the 101.
    pub bytes_to_server: u64,
    /// Raw bytes API server -> client after the 101.
    pub bytes_to_client: u64,
    /// Decoded data frames client -> API server.
    pub frames_to_server: u64,
    /// Decoded data frames API server -> client.
    pub frames_to_client: u64,
    /// Control frames (pings, SPDY stream management), both directions.
    pub control_frames: u64,
    /// Payload bytes per channel name and direction.
    pub payload_bytes: Vec<(String, Direction, u64)>,
    /// Why decoding stopped, if it did.
    pub decode_error: Option<String>,
    /// Credentials masked in the output sent to the client.
    pub masked_values: u64,
    /// Where each channel and direction is in `payload_bytes`: a client can open many
    /// streams (SPDY ids, port-forward ports), and a scan per frame would grow with them.
    payload_index: std::collections::HashMap<(String, Direction), usize>,
}

impl StreamStats {
    fn add_payload(&mut self, channel: &StreamChannel, dir: Direction, n: usize) {
        // Streams the tap does not know share one total, however many ids a client uses.
        let name = match channel {
            StreamChannel::Unknown(_) => "unknown".to_owned(),
            known => known.name(),
        };
        match self.payload_index.entry((name, dir)) {
            std::collections::hash_map::Entry::Occupied(at) => {
                self.payload_bytes[*at.get()].2 += n as u64;
            }
            std::collections::hash_map::Entry::Vacant(at) => {
                self.payload_bytes.push((at.key().0.clone(), dir, n as u64));
                at.insert(self.payload_bytes.len() - 1);
            }
        }
    }

    /// Payload bytes seen on `channel` in direction `dir`.
    pub fn payload(&self, channel: &str, dir: Direction) -> u64 {
        self.payload_bytes
            .iter()
            .filter(|(c, d, _)| c == channel && *d == dir)
            .map(|(_, _, n)| n)
            .sum()
    }
}

/// How the bytes of an upgraded stream are framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapFraming {
    /// WebSocket messages carrying `[channel][payload]` (`channel.k8s.io` v1/v4/v5 and the
    /// base64 variants); `ports` set for the v4 port-forward protocol (`?ports=`).
    WebSocketChannels {
        /// Text messages with an ASCII channel digit (`base64.channel.k8s.io`).
        base64: bool,
        /// Port-forward remote ports by index (channel 2i data, 2i+1 error).
        ports: Option<Vec<u16>>,
    },
    /// WebSocket binary messages whose concatenation is a SPDY session
    /// (`SPDY/3.1+portforward.k8s.io`).
    WebSocketSpdyTunnel,
    /// A SPDY/3.1 session.
    Spdy,
    /// Not understood: bytes are relayed and counted only.
    Opaque,
}

impl TapFraming {
    /// Chooses the framing from the request and the 101 response.
    pub fn detect(
        protocol: UpgradeProtocol,
        subresource: &str,
        query: Option<&str>,
        response: &HeaderMap,
    ) -> TapFraming {
        match protocol {
            UpgradeProtocol::Spdy => TapFraming::Spdy,
            UpgradeProtocol::WebSocket => {
                let sub = response
                    .get(header::SEC_WEBSOCKET_PROTOCOL)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                if sub.starts_with("spdy/3.1+portforward") {
                    return TapFraming::WebSocketSpdyTunnel;
                }
                if !(sub.is_empty() || sub.ends_with("channel.k8s.io")) {
                    return TapFraming::Opaque;
                }
                let ports = (subresource == "portforward").then(|| {
                    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                        .filter(|(k, _)| k == "ports")
                        .flat_map(|(_, v)| {
                            v.split(',')
                                .filter_map(|p| p.trim().parse::<u16>().ok())
                                .collect::<Vec<_>>()
                        })
                        .collect()
                });
                TapFraming::WebSocketChannels {
                    base64: sub.contains("base64"),
                    ports,
                }
            }
        }
    }
}

/// Both directions' decoders of one upgraded stream, plus what they learned.
pub struct StreamTap {
    audit_id: String,
    framing: TapFraming,
    ws: [WsDecoder; 2],
    spdy: [SpdyDecoder; 2],
    spdy_streams: std::collections::HashMap<u32, StreamChannel>,
    /// Port-forward streams one side has closed (FIN), with the sides' bits (by
    /// [`index`]): a stream closed both ways, or reset, is forgotten, so a port-forward
    /// that carries connection after connection does not grow the maps with each one.
    spdy_half_closed: std::collections::HashMap<u32, u8>,
    /// The highest stream id each direction has opened (SYN_STREAM), by [`index`].
    spdy_last_opened: [u32; 2],
    stopped: bool,
    /// Output to the client that had to be masked could not be (the stream ended).
    unmaskable: bool,
    stats: StreamStats,
    sink: Option<Arc<dyn FrameSink>>,
    /// Rewrites stdout/stderr going to the client, when the output is masked.
    output: Option<OutputMasker>,
    /// Checks the lines typed on stdin, when the policy has line rules for the session.
    stdin: Option<StdinGuard>,
    /// Records the session's frames into `exec_frames`, when on.
    recording: Option<SessionRecorder>,
}

impl std::fmt::Debug for StreamTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTap")
            .field("framing", &self.framing)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn index(dir: Direction) -> usize {
    match dir {
        Direction::ToServer => 0,
        Direction::ToClient => 1,
    }
}

impl StreamTap {
    /// A tap at the start of the stream.
    pub fn new(audit_id: &str, framing: TapFraming, sink: Option<Arc<dyn FrameSink>>) -> Self {
        let client_decoder = if matches!(framing, TapFraming::WebSocketChannels { .. }) {
            WsDecoder::per_frame()
        } else {
            WsDecoder::new()
        };
        Self {
            audit_id: audit_id.to_owned(),
            framing,
            // The API server reads the client's channel frames one by one; the client
            // reassembles the server's messages (and both sides of the SPDY tunnel are
            // gorilla/websocket, which reassembles).
            ws: [client_decoder, WsDecoder::new()],
            spdy: [SpdyDecoder::new(), SpdyDecoder::new()],
            spdy_streams: std::collections::HashMap::new(),
            spdy_half_closed: std::collections::HashMap::new(),
            spdy_last_opened: [0; 2],
            stopped: false,
            unmaskable: false,
            stats: StreamStats::default(),
            sink,
            output: None,
            stdin: None,
            recording: None,
        }
    }

    /// Checks each line typed on stdin against `rules`; a match closes the stream (see
    /// [`super::stdin_guard`]). Fails for framings without a readable stdin.
    pub(super) fn with_stdin_lines(
        mut self,
        rules: Arc<crate::policy::StdinLineRules>,
        shape: SessionShape,
    ) -> Result<Self, String> {
        self.stdin = Some(StdinGuard::new(rules, &self.framing, shape)?);
        Ok(self)
    }

    /// Why a stdin line rule closed the stream, once one did.
    pub fn stdin_violation(&self) -> Option<&str> {
        self.stdin.as_ref().and_then(StdinGuard::closed)
    }

    /// The frames to send in `dir` when the stream is stopped: after a stdin line rule
    /// matched, the reason and error status to the client and nothing to the API server;
    /// otherwise [`StreamTap::shutdown_frame`]. Nothing is inserted where `dir` is in the
    /// middle of a frame (that would corrupt the stream; the connection closes alone).
    pub fn closing_frames(&self, dir: Direction) -> Option<Vec<u8>> {
        let Some(guard) = self.stdin.as_ref().filter(|g| g.closed().is_some()) else {
            return self.shutdown_frame(dir);
        };
        let boundary = match self.framing {
            TapFraming::Spdy => self.spdy[index(dir)].at_frame_boundary(),
            _ => self.ws[index(dir)].at_frame_boundary(),
        };
        if dir == Direction::ToServer || self.stopped || !boundary {
            return None;
        }
        Some(guard.closing_frames(&self.framing, &self.spdy_streams))
    }

    /// Records the session's frames (as the receiver gets them: output after masking)
    /// with `recording`. A frame that cannot be recorded, or a stream the tap cannot
    /// decode, then ends the stream ([`StreamTap::recording_failure`]).
    pub fn with_recording(mut self, recording: SessionRecorder) -> Self {
        self.recording = Some(recording);
        self
    }

    /// Why the stream must end because its frames cannot be recorded, once that happened.
    pub fn recording_failure(&self) -> Option<&str> {
        self.recording.as_ref().and_then(SessionRecorder::failure)
    }

    /// Takes the session recorder out of the tap, to record the end of the session.
    pub fn take_recording(&mut self) -> Option<SessionRecorder> {
        self.recording.take()
    }

    /// Masks the stdout and stderr channels on their way to the client with `detectors`.
    /// Fails for framings the masker cannot rewrite (the caller refuses the stream).
    pub fn with_masking(mut self, detectors: &Detectors) -> Result<Self, String> {
        let framing = match &self.framing {
            TapFraming::WebSocketChannels {
                base64,
                ports: None,
            } => OutputFraming::WebSocket { base64: *base64 },
            TapFraming::Spdy => OutputFraming::Spdy,
            other => {
                return Err(format!(
                    "the stream's framing ({other:?}) carries no exec channels the gateway can mask"
                ));
            }
        };
        self.output = Some(OutputMasker::new(framing, detectors));
        Ok(self)
    }

    /// Whether output to the client is masked.
    pub fn masks_output(&self) -> bool {
        self.output.is_some()
    }

    /// Whether output that had to be masked could not be, which ended the stream.
    pub fn masking_failed(&self) -> bool {
        self.unmaskable
    }

    /// Passes relayed bytes: rewrites them when they go to the client and are masked, and
    /// feeds the tap what will be sent. `Ok(None)`: send `data` as it is. An error means
    /// the output cannot be masked and the stream must end.
    pub fn pass(&mut self, dir: Direction, data: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        let rewritten = match (&mut self.output, dir) {
            (Some(output), Direction::ToClient) => {
                let mut out = Vec::with_capacity(data.len() + 64);
                if let Err(e) = output.feed(data, &self.spdy_streams, &mut out) {
                    self.unmaskable = true;
                    return Err(e);
                }
                self.stats.masked_values = output.masked();
                Some(out)
            }
            _ => None,
        };
        self.feed(dir, rewritten.as_deref().unwrap_or(data));
        Ok(rewritten)
    }

    /// When output held back for masking must be sent, if any is held.
    pub fn hold_deadline(&self) -> Option<std::time::Instant> {
        self.output.as_ref().and_then(OutputMasker::deadline)
    }

    /// Output held back for masking, masked, as frames to send now (tapped like the rest).
    pub fn flush_held(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(output) = &mut self.output {
            output.flush(&mut out);
            self.stats.masked_values = output.masked();
        }
        if !out.is_empty() {
            self.feed(Direction::ToClient, &out);
        }
        out
    }

    /// The totals so far.
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// The WebSocket Close frame (1001 "going away") to send in `dir` when the gateway
    /// shuts down, so the peer sees the stream end rather than break. `None` for SPDY and
    /// opaque streams, and when `dir` is in the middle of a frame (inserting one there would
    /// corrupt the stream; the orderly TLS close alone is sent then).
    pub fn shutdown_frame(&self, dir: Direction) -> Option<Vec<u8>> {
        let websocket = matches!(
            self.framing,
            TapFraming::WebSocketSpdyTunnel | TapFraming::WebSocketChannels { .. }
        );
        if !websocket || self.stopped || !self.ws[index(dir)].at_frame_boundary() {
            return None;
        }
        let mut payload = 1001u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"the gateway is shutting down");
        // Client-to-server frames must be masked; the key only needs to be unpredictable.
        let mask = match dir {
            Direction::ToServer => {
                let random = uuid::Uuid::now_v7().into_bytes();
                Some([random[12], random[13], random[14], random[15]])
            }
            Direction::ToClient => None,
        };
        Some(ws_encode(WsOpcode::Close, &payload, mask))
    }

    /// Feeds relayed bytes; never fails (a decoding error is remembered and ends decoding).
    pub fn feed(&mut self, dir: Direction, data: &[u8]) {
        match dir {
            Direction::ToServer => self.stats.bytes_to_server += data.len() as u64,
            Direction::ToClient => self.stats.bytes_to_client += data.len() as u64,
        }
        if self.stopped {
            return;
        }
        if let Err(e) = self.decode(dir, data) {
            tracing::debug!(audit_id = %self.audit_id, direction = ?dir, error = %e, "stream tap stopped decoding");
            self.stats.decode_error = Some(format!("{dir:?}: {e}"));
            self.stopped = true;
            // Stdin that cannot be read cannot be checked: fail closed.
            if let Some(guard) = &mut self.stdin {
                guard.fail(&e.to_string());
            }
            // Frames that cannot be decoded cannot be recorded: a recorded stream ends.
            if let Some(recording) = &mut self.recording {
                recording.fail_with(&format!(
                    "the stream cannot be decoded for recording ({dir:?}: {e}), so it is ended"
                ));
            }
        }
    }

    fn decode(&mut self, dir: Direction, data: &[u8]) -> Result<(), FrameError> {
        let i = index(dir);
        match self.framing.clone() {
            TapFraming::Opaque => Ok(()),
            TapFraming::Spdy => {
                let frames = self.spdy[i].feed(data)?;
                self.spdy_frames(dir, frames);
                Ok(())
            }
            TapFraming::WebSocketSpdyTunnel => {
                for msg in self.ws[i].feed(data)? {
                    if msg.opcode == WsOpcode::Binary {
                        let frames = self.spdy[i].feed(&msg.payload)?;
                        self.spdy_frames(dir, frames);
                    } else {
                        self.stats.control_frames += 1;
                    }
                }
                Ok(())
            }
            TapFraming::WebSocketChannels { base64, ports } => {
                for msg in self.ws[i].feed(data)? {
                    self.channel_message(dir, &msg, base64, ports.as_deref());
                }
                Ok(())
            }
        }
    }

    fn channel_message(
        &mut self,
        dir: Direction,
        msg: &WsMessage,
        base64: bool,
        ports: Option<&[u16]>,
    ) {
        let data_message = match msg.opcode {
            // The API server takes a text and a binary message alike (x/net/websocket
            // ignores the type when it receives into bytes): a client cannot hide stdin
            // from the tap by sending it with the other type.
            WsOpcode::Binary | WsOpcode::Text if dir == Direction::ToServer => true,
            WsOpcode::Binary => !base64,
            WsOpcode::Text => base64,
            _ => false,
        };
        let Some((&first, payload)) = msg.payload.split_first().filter(|_| data_message) else {
            self.stats.control_frames += 1;
            return;
        };
        let ch = if base64 {
            u32::from(first.wrapping_sub(b'0'))
        } else {
            u32::from(first)
        };
        let channel = match ports {
            Some(ports) => {
                let port = ports.get((ch / 2) as usize).copied();
                if ch % 2 == 0 {
                    StreamChannel::PortForwardData(port)
                } else {
                    StreamChannel::PortForwardError(port)
                }
            }
            None => match ch {
                0 => StreamChannel::Stdin,
                1 => StreamChannel::Stdout,
                2 => StreamChannel::Stderr,
                3 => StreamChannel::Error,
                4 => StreamChannel::Resize,
                255 => StreamChannel::Close,
                other => StreamChannel::Unknown(other),
            },
        };
        if dir == Direction::ToServer
            && let Some(guard) = &mut self.stdin
        {
            match channel {
                StreamChannel::Stdin if base64 => guard.base64_data(payload),
                StreamChannel::Stdin => guard.data(payload),
                // v5: the client closed its stdin.
                StreamChannel::Close if payload.first() == Some(&0) => guard.end(),
                _ => {}
            }
        }
        self.emit(dir, &channel, payload);
    }

    fn spdy_frames(&mut self, dir: Direction, frames: Vec<SpdyFrame>) {
        for frame in frames {
            match frame {
                SpdyFrame::SynStream {
                    id, headers, flags, ..
                } => {
                    self.stats.control_frames += 1;
                    // spdystream refuses (RST_STREAM) a SYN_STREAM whose id is not above
                    // every id the peer opened before, and keeps the stream that id names:
                    // so must the tap, or a repeated SYN_STREAM would relabel stdin as
                    // stdout (unchecked) or stdout as error (unmasked).
                    let last = &mut self.spdy_last_opened[index(dir)];
                    if id <= *last {
                        continue;
                    }
                    *last = id;
                    let port = spdy_header(&headers, "port").and_then(|p| p.parse().ok());
                    let portforward = spdy_header(&headers, "requestid").is_some();
                    let channel = match spdy_header(&headers, "streamtype") {
                        Some("stdin") => StreamChannel::Stdin,
                        Some("stdout") => StreamChannel::Stdout,
                        Some("stderr") => StreamChannel::Stderr,
                        Some("resize") => StreamChannel::Resize,
                        Some("error") if portforward => StreamChannel::PortForwardError(port),
                        Some("error") => StreamChannel::Error,
                        Some("data") => StreamChannel::PortForwardData(port),
                        _ => StreamChannel::Unknown(id),
                    };
                    self.spdy_streams.insert(id, channel);
                    // Opened already half-closed (SPDY's FLAG_FIN on SYN_STREAM).
                    if flags & crate::proxy::frames::SPDY_FLAG_FIN != 0 {
                        self.half_closed(id, dir);
                    }
                }
                SpdyFrame::SynReply { id, flags, .. } => {
                    self.stats.control_frames += 1;
                    if flags & crate::proxy::frames::SPDY_FLAG_FIN != 0 {
                        self.half_closed(id, dir);
                    }
                }
                SpdyFrame::Data { id, payload, flags } => {
                    let channel = self
                        .spdy_streams
                        .get(&id)
                        .cloned()
                        .unwrap_or(StreamChannel::Unknown(id));
                    if dir == Direction::ToServer
                        && channel == StreamChannel::Stdin
                        && let Some(guard) = &mut self.stdin
                    {
                        guard.data(&payload);
                        if flags & crate::proxy::frames::SPDY_FLAG_FIN != 0 {
                            guard.end();
                        }
                    }
                    if payload.is_empty() {
                        // A bare FIN is a half-close, not data.
                        self.stats.control_frames += 1;
                    } else {
                        self.emit(dir, &channel, &payload);
                    }
                    if flags & crate::proxy::frames::SPDY_FLAG_FIN != 0 {
                        self.half_closed(id, dir);
                    }
                }
                SpdyFrame::RstStream { id, .. } => {
                    self.stats.control_frames += 1;
                    // Both ends drop a reset stream (spdystream ignores data on it after).
                    // Only port-forward's are forgotten: exec's few streams stay labelled
                    // whatever a peer sends.
                    if self
                        .spdy_streams
                        .get(&id)
                        .is_some_and(StreamChannel::is_portforward)
                    {
                        self.forget_stream(id);
                    }
                }
                _ => self.stats.control_frames += 1,
            }
        }
    }

    /// `dir`'s side of stream `id` is closed (FIN): a port-forward stream closed both ways
    /// is forgotten.
    fn half_closed(&mut self, id: u32, dir: Direction) {
        if !self
            .spdy_streams
            .get(&id)
            .is_some_and(StreamChannel::is_portforward)
        {
            return;
        }
        let sides = self.spdy_half_closed.entry(id).or_default();
        *sides |= 1 << index(dir);
        if *sides == 0b11 {
            self.forget_stream(id);
        }
    }

    fn forget_stream(&mut self, id: u32) {
        self.spdy_streams.remove(&id);
        self.spdy_half_closed.remove(&id);
    }

    /// SPDY streams the tap holds labels for (tests: it must not grow without bound).
    #[cfg(test)]
    fn spdy_streams_held(&self) -> (usize, usize) {
        (self.spdy_streams.len(), self.spdy_half_closed.len())
    }

    fn emit(&mut self, dir: Direction, channel: &StreamChannel, payload: &[u8]) {
        match dir {
            Direction::ToServer => self.stats.frames_to_server += 1,
            Direction::ToClient => self.stats.frames_to_client += 1,
        }
        self.stats.add_payload(channel, dir, payload.len());
        tracing::debug!(audit_id = %self.audit_id, direction = ?dir, channel = %channel.name(), bytes = payload.len(), "stream frame");
        if let Some(recording) = &mut self.recording {
            let direction = match dir {
                Direction::ToServer => "to_server",
                Direction::ToClient => "to_client",
            };
            // A failure is kept in the recorder; the pump ends the stream on it.
            let _ = recording.frame(direction, &channel.name(), payload);
        }
        if let Some(sink) = &self.sink {
            sink.frame(&FrameEvent {
                audit_id: &self.audit_id,
                direction: dir,
                channel,
                payload,
            });
        }
    }
}

/// Copies one direction, tapping each chunk; ends at EOF (half-closing the writer).
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    dir: Direction,
    tap: &Mutex<StreamTap>,
    stop: &CancellationToken,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    // A poisoned lock only means another direction panicked; the tap's state is still
    // whole, and masking must go on.
    let lock = || {
        tap.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    loop {
        let deadline = match dir {
            Direction::ToClient => lock().hold_deadline(),
            Direction::ToServer => None,
        };
        let read = tokio::select! {
            biased;
            // The gateway is shutting down: close this direction the orderly way (TLS
            // close_notify, then FIN), so both peers see the stream end, not break.
            () = stop.cancelled() => {
                let (held, close) = {
                    let mut tap = lock();
                    let held = match dir {
                        Direction::ToClient => tap.flush_held(),
                        Direction::ToServer => Vec::new(),
                    };
                    (held, tap.closing_frames(dir))
                };
                if !held.is_empty() {
                    let _ = to.write_all(&held).await;
                }
                if let Some(frame) = close {
                    let _ = to.write_all(&frame).await;
                }
                let _ = to.shutdown().await;
                return Ok(());
            }
            // Output held back for masking has waited long enough: send it masked as is.
            () = hold_expired(deadline) => {
                let held = {
                    let mut tap = lock();
                    let held = tap.flush_held();
                    if let Some(why) = tap.recording_failure() {
                        return Err(std::io::Error::other(why.to_owned()));
                    }
                    held
                };
                if !held.is_empty() {
                    to.write_all(&held).await?;
                    to.flush().await?;
                }
                continue;
            }
            read = from.read(&mut buf) => read,
        };
        let n = match read {
            Ok(n) => n,
            // Many peers (Go included, on abrupt closes) skip TLS close_notify; for a
            // relay that is still the end of the stream.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            let held = match dir {
                Direction::ToClient => lock().flush_held(),
                Direction::ToServer => Vec::new(),
            };
            if !held.is_empty() {
                let _ = to.write_all(&held).await;
            }
            // The peer may already be gone; the other direction reports that.
            let _ = to.shutdown().await;
            return Ok(());
        }
        // Fail closed: output that cannot be masked, or frames that cannot be recorded,
        // end the stream before the bytes are sent.
        let (rewritten, stdin_denied) = {
            let mut tap = lock();
            let rewritten = tap.pass(dir, &buf[..n]).map_err(|e| {
                std::io::Error::other(format!("the output cannot be masked, stream ended: {e}"))
            })?;
            if let Some(why) = tap.recording_failure() {
                return Err(std::io::Error::other(why.to_owned()));
            }
            (rewritten, tap.stdin_violation().is_some())
        };
        // A stdin line rule matched: the chunk that completed the line is not sent, and
        // both directions close (the stop branch above sends the client the reason).
        if stdin_denied && dir == Direction::ToServer {
            stop.cancel();
            continue;
        }
        to.write_all(rewritten.as_deref().unwrap_or(&buf[..n]))
            .await?;
        to.flush().await?;
    }
}

/// Resolves at `deadline`, never without one.
async fn hold_expired(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Relays bytes both ways until both directions reached EOF or one failed, or `stop` is
/// cancelled (then both directions are closed in order); returns the first I/O error, if
/// any.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    tap: &Mutex<StreamTap>,
    stop: &CancellationToken,
) -> Option<String>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (client_r, client_w) = tokio::io::split(client);
    let (upstream_r, upstream_w) = tokio::io::split(upstream);
    // Cancelled with `stop`, or by a pump (a stdin line rule closes the stream).
    let stop = &stop.child_token();
    let up = pump(client_r, upstream_w, Direction::ToServer, tap, stop);
    let down = pump(upstream_r, client_w, Direction::ToClient, tap, stop);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    // A peer that resets after the other side has finished (a client closing with
    // unread pings in its buffer) ended the stream; before that, it broke it.
    let after_end = |e: &std::io::Error, other_done: bool| {
        other_done
            && matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            )
    };
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(e) if after_end(&e, down_done) => up_done = true,
                Err(e) => return Some(format!("client -> API server: {e}")),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(e) if after_end(&e, up_done) => down_done = true,
                Err(e) => return Some(format!("API server -> client: {e}")),
            },
        }
    }
    None
}

/// Headers of the 101 that go back to the client: the message headers plus the
/// Connection/Upgrade pair the handshake needs.
fn switching_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = upstream.clone();
    let upgrade = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
    }
    headers
}

impl Proxy {
    /// Forwards an allowed upgrade request and, on 101, relays the stream.
    pub(super) async fn forward_upgrade(
        &self,
        mut req: Request<Incoming>,
        protocol: UpgradeProtocol,
        slot: Option<SlotHold>,
        mut record: Row<'_>,
        audit_id: String,
    ) -> Response<ProxyBody> {
        let client_upgrade = hyper::upgrade::on(&mut req);
        let mask = req.extensions_mut().remove::<StreamMasking>().map(|m| m.0);
        let stdin_lines = req.extensions_mut().remove::<StdinLines>().map(|l| l.0);
        let live = req.extensions_mut().remove::<LiveStop>();
        let subresource = record.object_ref.subresource.clone();
        let (mut parts, body) = req.into_parts();
        let query = parts.uri.query().map(str::to_owned);
        let upgrade_value = parts.headers.get(header::UPGRADE).cloned();
        let path = match upstream_uri(&self.upstream_base, &parts.uri) {
            Ok(uri) => uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".to_owned()),
            Err(e) => {
                record.outcome = Outcome::Invalid;
                let status =
                    Status::bad_request(format!("chaperone: cannot forward {}: {e}", parts.uri));
                return self.local_response(status, record, &audit_id);
            }
        };
        sanitize_request_headers(&mut parts.headers);
        insert_audit_id(&mut parts.headers, &audit_id);
        // The tap cannot read compressed messages; without the offer none is negotiated.
        parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Some(u) = upgrade_value {
            parts.headers.insert(header::UPGRADE, u);
        }
        if let Ok(host) = HeaderValue::from_str(&self.dialer.authority) {
            parts.headers.insert(header::HOST, host);
        }
        if let Err(cause) = self.upstream_credentials(&mut parts.headers, &parts.extensions) {
            return self.credential_unavailable(&cause, record, &audit_id);
        }
        let request_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = CountingBody {
            inner: body.map_err(BoxError::from).boxed(),
            count: request_bytes.clone(),
        };
        let mut upstream_req = Request::new(counted.boxed());
        *upstream_req.method_mut() = parts.method;
        *upstream_req.version_mut() = http::Version::HTTP_11;
        *upstream_req.headers_mut() = parts.headers;
        *upstream_req.uri_mut() = match path.parse() {
            Ok(uri) => uri,
            Err(e) => {
                record.outcome = Outcome::Invalid;
                let status = Status::bad_request(format!("chaperone: cannot forward {path}: {e}"));
                return self.local_response(status, record, &audit_id);
            }
        };

        // exec, attach and port-forward act on the pod as soon as they are sent.
        record.may_have_applied = true;
        let response = match self.send_upgrade(upstream_req).await {
            Ok(r) => r,
            Err(cause) => {
                tracing::warn!(upstream = %self.upstream_base, error = %cause, "upstream upgrade request failed");
                record.outcome = Outcome::UpstreamFailed;
                record.error = Some(cause.clone());
                let status = Status::failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!(
                        "chaperone: the API server at {} is unavailable: {cause}",
                        self.upstream_base
                    ),
                );
                return self.local_response(status, record, &audit_id);
            }
        };
        record.response_code = i32::from(response.status().as_u16());
        record.response_time = Some(jiff::Timestamp::now());
        record.outcome = Outcome::Forwarded;

        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            keep_or_insert_audit_id(&mut parts.headers, &audit_id);
            let guard = record.into_guard(RequestBytes::Counted(request_bytes));
            let body = Metered::new(body.map_err(BoxError::from).boxed(), guard);
            return Response::from_parts(parts, body.boxed());
        }

        let mut response = response;
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let framing =
            TapFraming::detect(protocol, &subresource, query.as_deref(), response.headers());
        let sink = self
            .frame_sink
            .read()
            .ok()
            .and_then(|s| s.as_ref().map(Arc::clone));
        let opaque = framing == TapFraming::Opaque;
        let mut tap = StreamTap::new(&audit_id, framing, sink.clone());
        // exec and attach output is masked when the decision says so; port-forward never
        // (see the module docs).
        if let Some(detectors) = mask.filter(|_| matches!(subresource.as_str(), "exec" | "attach"))
        {
            tap = match tap.with_masking(&detectors) {
                Ok(tap) => tap,
                Err(why) => {
                    // Fail closed: the client gets an error instead of unmasked output.
                    let why = format!(
                        "chaperone: this {subresource} stream's output must be masked, but {why}"
                    );
                    self.metrics.masking_failures.inc();
                    // The API server had answered 101: the command may have started
                    // before the stream was closed.
                    record.outcome = Outcome::Unknown;
                    record.reason = Some(why.clone());
                    let status =
                        Status::failure(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", why);
                    return self.local_response(status, record, &audit_id);
                }
            };
        }
        if let Some(rules) =
            stdin_lines.filter(|_| matches!(subresource.as_str(), "exec" | "attach"))
        {
            let shape = SessionShape::new(query.as_deref(), response.headers());
            tap = match tap.with_stdin_lines(rules, shape) {
                Ok(tap) => tap,
                Err(why) => {
                    // Fail closed: a session whose stdin cannot be checked is not opened.
                    let why = format!(
                        "chaperone: the policy checks the lines typed on this {subresource} stream's stdin, but {why}"
                    );
                    record.outcome = Outcome::Invalid;
                    record.reason = Some(why.clone());
                    let status =
                        Status::failure(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", why);
                    return self.local_response(status, record, &audit_id);
                }
            };
        }
        // Every exec, attach and port-forward session is recorded into `exec_frames`.
        let session_kind = match subresource.as_str() {
            "exec" | "attach" => Some(SessionKind::Exec),
            "portforward" => Some(SessionKind::PortForward),
            _ => None,
        };
        if let Some(kind) = session_kind {
            if kind == SessionKind::Exec && opaque {
                // Fail closed: frames the tap cannot decode cannot be recorded.
                let why = format!(
                    "chaperone: this {subresource} stream must be recorded, but its protocol ({}) cannot be decoded",
                    response
                        .headers()
                        .get(header::SEC_WEBSOCKET_PROTOCOL)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("unknown")
                );
                record.outcome = Outcome::Invalid;
                record.reason = Some(why.clone());
                let status =
                    Status::failure(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", why);
                return self.local_response(status, record, &audit_id);
            }
            tap = tap.with_recording(self.recorder.session(&audit_id, kind));
        }
        let mut headers = switching_headers(response.headers());
        keep_or_insert_audit_id(&mut headers, &audit_id);
        let mut guard = record.into_guard(RequestBytes::Counted(request_bytes));
        // Ends on the drain, or when a reloaded policy denies the session.
        let (stop, live_guard) = match live {
            Some(live) => (live.stop, Some(live.guard)),
            None => (self.draining.clone(), None),
        };
        let draining = self.draining.clone();
        let metrics = self.metrics.clone();
        // Tracked so the drain waits for the stream to close and its row to be recorded.
        self.streams.spawn(async move {
            let _registered = live_guard;
            let tap = Mutex::new(tap);
            let mut error = match (client_upgrade.await, upstream_upgrade.await) {
                (Ok(client), Ok(upstream)) => {
                    relay(TokioIo::new(client), TokioIo::new(upstream), &tap, &stop).await
                }
                (Err(e), _) => Some(format!("client upgrade: {}", error_chain(&e))),
                (_, Err(e)) => Some(format!("API server upgrade: {}", error_chain(&e))),
            };
            if error.is_none() && stop.is_cancelled() {
                error = Some(if draining.is_cancelled() {
                    "stream closed by the gateway's shutdown".to_owned()
                } else {
                    "stream closed: the reloaded policy denies it".to_owned()
                });
            }
            let mut tap = tap
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if tap.masking_failed() {
                metrics.masking_failures.inc();
            }
            if let Some(why) = tap.recording_failure() {
                error.get_or_insert_with(|| why.to_owned());
            }
            if let Some(recording) = tap.take_recording()
                && let Err(e) = recording.finish(error.as_deref()).await
            {
                tracing::error!(%audit_id, error = %e, "the end of the session could not be recorded");
                error.get_or_insert_with(|| format!("the end of the session could not be recorded: {e}"));
            }
            let stdin_violation = tap.stdin_violation().map(str::to_owned);
            let stats = tap.stats;
            tracing::debug!(%audit_id, ?stats, ?error, "upgraded stream ended");
            if let Some(sink) = &sink {
                sink.finished(&audit_id, &stats);
            }
            guard.request_bytes.add(stats.bytes_to_server);
            guard.response_bytes = stats.bytes_to_client;
            if let Some(why) = &stdin_violation {
                tracing::info!(%audit_id, reason = %why, "stream closed by a stdin line rule");
                error.get_or_insert_with(|| {
                    "stream closed: a stdin line matched a stdinLines rule".to_owned()
                });
            }
            if let Some(record) = guard.pending.as_mut() {
                if let Some(why) = stdin_violation {
                    record.reason = Some(why);
                }
                record.error = error;
                record.masked_fields = record
                    .masked_fields
                    .saturating_add(i32::try_from(stats.masked_values).unwrap_or(i32::MAX));
            }
            drop(guard);
            drop(slot);
        });
        let mut out = Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
        *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *out.headers_mut() = headers;
        out
    }

    async fn send_upgrade(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, String> {
        let tls = self.dialer.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {}", error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
            }
        });
        sender.send_request(req).await.map_err(|e| error_chain(&e))
    }
}

#[cfg(test)]
#[path = "upgrade_tests.rs"]
mod tests;
