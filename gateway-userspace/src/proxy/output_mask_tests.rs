use std::sync::{Arc, Mutex};

use chaperone_testkit::spdy_frames::SpdyEncoder;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    masking::detect::{DetectorsSpec, tests::fixtures},
    proxy::{
        frames::{SpdyDecoder, SpdyFrame, WsDecoder, WsOpcode, ws_encode},
        upgrade::{Direction, FrameEvent, FrameSink, StreamTap, TapFraming, relay},
    },
};

use super::*;

fn detectors() -> Detectors {
    Detectors::compile(&DetectorsSpec::default()).expect("detectors")
}

fn v5() -> TapFraming {
    TapFraming::WebSocketChannels {
        base64: false,
        ports: None,
    }
}

/// Frames the tap saw going to the client: (channel, payload).
#[derive(Default)]
struct Recording(Mutex<Vec<(String, Vec<u8>)>>);

impl FrameSink for Recording {
    fn frame(&self, e: &FrameEvent<'_>) {
        if e.direction == Direction::ToClient {
            self.0
                .lock()
                .unwrap()
                .push((e.channel.name(), e.payload.to_vec()));
        }
    }
}

impl Recording {
    fn channel(&self, name: &str) -> Vec<u8> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| c == name)
            .flat_map(|(_, p)| p.clone())
            .collect()
    }
}

fn ws_channel(ch: u8, data: &[u8]) -> Vec<u8> {
    let mut payload = vec![ch];
    payload.extend_from_slice(data);
    ws_encode(WsOpcode::Binary, &payload, None)
}

/// What a client reads from `bytes`: per channel, the concatenated payloads, in order.
fn ws_client_view(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut dec = WsDecoder::new();
    let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
    for msg in dec.feed(bytes).expect("the client can decode every frame") {
        if msg.opcode != WsOpcode::Binary {
            continue;
        }
        let (&ch, data) = msg.payload.split_first().expect("channel byte");
        match out.last_mut() {
            Some((c, acc)) if *c == ch => acc.extend_from_slice(data),
            _ => out.push((ch, data.to_vec())),
        }
    }
    assert!(dec.at_frame_boundary(), "no partial frame sent");
    out
}

#[test]
fn websocket_stdout_is_masked_across_frames_and_reframed() {
    let token = fixtures::github_token();
    let text = format!("config:\nGITHUB_TOKEN={token}\nbye\n");
    let (a, b) = text.split_at(20); // inside the token
    let mut down = Vec::new();
    down.extend(ws_channel(1, a.as_bytes()));
    down.extend(ws_channel(1, b.as_bytes()));
    down.extend(ws_channel(2, b"warning: nothing\n"));
    down.extend(ws_encode(WsOpcode::Ping, b"p", None));
    down.extend(ws_channel(3, br#"{"status":"Success"}"#));
    let sink = Arc::new(Recording::default());
    let mut tap = StreamTap::new("m1", v5(), Some(sink.clone() as Arc<dyn FrameSink>))
        .with_masking(&detectors())
        .expect("maskable");
    let mut sent = Vec::new();
    // Any read size: the masker reassembles frames.
    for chunk in down.chunks(7) {
        let out = tap.pass(Direction::ToClient, chunk).expect("masks");
        sent.extend(out.expect("rewritten"));
    }
    sent.extend(tap.flush_held());
    let want_stdout = "config:\nGITHUB_TOKEN=**masked:github-token**\nbye\n";
    assert_eq!(
        ws_client_view(&sent),
        vec![
            (1, want_stdout.as_bytes().to_vec()),
            (2, b"warning: nothing\n".to_vec()),
            (3, br#"{"status":"Success"}"#.to_vec()),
        ]
    );
    // The recording holds what the client got: the masked form only.
    assert_eq!(sink.channel("stdout"), want_stdout.as_bytes());
    assert!(!String::from_utf8_lossy(&sent).contains(&token[4..]));
    assert_eq!(tap.stats().masked_values, 1);
}

#[test]
fn held_output_goes_out_before_the_exit_status() {
    let mut tap = StreamTap::new("m2", v5(), None)
        .with_masking(&detectors())
        .expect("maskable");
    let mut sent = Vec::new();
    sent.extend(
        tap.pass(
            Direction::ToClient,
            &ws_channel(1, b"$ prompt without newline"),
        )
        .unwrap()
        .unwrap(),
    );
    assert!(sent.is_empty(), "a partial line is held");
    assert!(tap.hold_deadline().is_some());
    sent.extend(
        tap.pass(Direction::ToClient, &ws_channel(3, b"{}"))
            .unwrap()
            .unwrap(),
    );
    assert_eq!(
        ws_client_view(&sent),
        vec![
            (1, b"$ prompt without newline".to_vec()),
            (3, b"{}".to_vec())
        ]
    );
    assert!(tap.hold_deadline().is_none());
}

#[test]
fn client_to_server_bytes_and_unmasked_taps_pass_untouched() {
    let mut tap = StreamTap::new("m3", v5(), None)
        .with_masking(&detectors())
        .expect("maskable");
    let token = fixtures::github_token();
    let stdin = ws_encode(
        WsOpcode::Binary,
        &[&[0u8][..], token.as_bytes()].concat(),
        Some([1, 2, 3, 4]),
    );
    assert_eq!(tap.pass(Direction::ToServer, &stdin).unwrap(), None);
    let mut plain = StreamTap::new("m4", v5(), None);
    assert_eq!(
        plain
            .pass(Direction::ToClient, &ws_channel(1, token.as_bytes()))
            .unwrap(),
        None
    );
    // Port-forward and unknown protocols are not masked; the caller refuses the latter.
    let pf = TapFraming::WebSocketChannels {
        base64: false,
        ports: Some(vec![80]),
    };
    assert!(
        StreamTap::new("m5", pf, None)
            .with_masking(&detectors())
            .is_err()
    );
    assert!(
        StreamTap::new("m6", TapFraming::Opaque, None)
            .with_masking(&detectors())
            .is_err()
    );
}

#[test]
fn binary_output_is_passed_byte_for_byte() {
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let mut down = Vec::new();
    for chunk in data.chunks(30_000) {
        down.extend(ws_channel(1, chunk));
    }
    let mut tap = StreamTap::new("m7", v5(), None)
        .with_masking(&detectors())
        .expect("maskable");
    let mut sent = Vec::new();
    for chunk in down.chunks(4096) {
        sent.extend(tap.pass(Direction::ToClient, chunk).unwrap().unwrap());
    }
    sent.extend(tap.flush_held());
    let view = ws_client_view(&sent);
    assert_eq!(view, vec![(1, data)]);
}

#[test]
fn base64_channels_are_decoded_masked_and_encoded_again() {
    let token = fixtures::github_token();
    let framing = TapFraming::WebSocketChannels {
        base64: true,
        ports: None,
    };
    let mut tap = StreamTap::new("m8", framing, None)
        .with_masking(&detectors())
        .expect("maskable");
    let line = format!("t={token}\n");
    let mut payload = b"1".to_vec();
    payload.extend(
        base64::engine::general_purpose::STANDARD
            .encode(&line)
            .as_bytes(),
    );
    let sent = tap
        .pass(
            Direction::ToClient,
            &ws_encode(WsOpcode::Text, &payload, None),
        )
        .unwrap()
        .unwrap();
    let msgs = WsDecoder::new().feed(&sent).unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].opcode, WsOpcode::Text);
    assert_eq!(msgs[0].payload[0], b'1');
    let text = base64::engine::general_purpose::STANDARD
        .decode(&msgs[0].payload[1..])
        .unwrap();
    assert_eq!(text, b"t=**masked:github-token**\n");
}

#[test]
fn malformed_frames_end_the_stream_instead_of_passing_unmasked() {
    let mut tap = StreamTap::new("m9", v5(), None)
        .with_masking(&detectors())
        .expect("maskable");
    // RSV1 set: a compressed frame the gateway did not negotiate.
    let mut frame = ws_channel(1, b"hello\n");
    frame[0] |= 0x40;
    assert!(!tap.masking_failed());
    assert!(tap.pass(Direction::ToClient, &frame).is_err());
    // Said, so the stream's end is counted in chaperone_masking_failures_total.
    assert!(tap.masking_failed());
    assert!(
        tap.pass(Direction::ToClient, &ws_channel(1, b"x\n"))
            .is_err()
    );
}

#[test]
fn spdy_stdout_is_masked_and_reframed_with_control_frames_untouched() {
    let token = fixtures::github_token();
    let sink = Arc::new(Recording::default());
    let mut tap = StreamTap::new(
        "m10",
        TapFraming::Spdy,
        Some(sink.clone() as Arc<dyn FrameSink>),
    )
    .with_masking(&detectors())
    .expect("maskable");
    let mut client = SpdyEncoder::new().expect("encoder");
    let mut server = SpdyEncoder::new().expect("encoder");
    let mut up = Vec::new();
    for (id, kind) in [(1, "error"), (3, "stdout"), (5, "stderr")] {
        up.extend(client.syn_stream(id, 0, &[("streamtype", kind)]).unwrap());
    }
    assert_eq!(tap.pass(Direction::ToServer, &up).unwrap(), None);
    let text = format!("token: {token}\n");
    let (a, b) = text.split_at(15);
    let mut down = Vec::new();
    let mut replies = Vec::new();
    for id in [1, 3, 5] {
        replies.extend(server.syn_reply(id, 0, &[]).unwrap());
    }
    down.extend(&replies);
    down.extend(SpdyEncoder::data(3, a.as_bytes(), false));
    down.extend(SpdyEncoder::ping(2));
    down.extend(SpdyEncoder::data(3, b.as_bytes(), false));
    down.extend(SpdyEncoder::data(5, b"no newline", false));
    down.extend(SpdyEncoder::data(3, b"", true));
    down.extend(SpdyEncoder::data(1, b"{}", true));
    let mut sent = Vec::new();
    for chunk in down.chunks(9) {
        sent.extend(tap.pass(Direction::ToClient, chunk).unwrap().unwrap());
    }
    // Header blocks share one zlib context, so they must arrive exactly as sent.
    assert!(sent.starts_with(&replies));
    let frames = SpdyDecoder::new()
        .feed(&sent)
        .expect("the client decodes it");
    let mut stdout = Vec::new();
    let mut order = Vec::new();
    for f in &frames {
        match f {
            SpdyFrame::Data { id, payload, .. } => {
                if *id == 3 {
                    stdout.extend_from_slice(payload);
                }
                order.push((*id, f.fin(), payload.clone()));
            }
            SpdyFrame::Ping(_) => order.push((0, false, b"ping".to_vec())),
            _ => {}
        }
    }
    assert_eq!(stdout, b"token: **masked:github-token**\n");
    assert_eq!(
        order,
        vec![
            (0, false, b"ping".to_vec()),
            (3, false, b"token: **masked:github-token**\n".to_vec()),
            (3, true, Vec::new()),
            // Data on the error stream flushes stderr's held partial line first.
            (5, false, b"no newline".to_vec()),
            (1, true, b"{}".to_vec()),
        ]
    );
    assert_eq!(sink.channel("stdout"), b"token: **masked:github-token**\n");
}

/// spdystream splits NUL-joined header values and the kubelet reads the first, so
/// `streamtype: "stdout\0"` is stdout to it: it must be stdout to the masker too. And
/// output on a stream whose type the tap does not know ends the session.
#[test]
fn spdy_stream_types_are_read_as_the_kubelet_reads_them_and_unknown_output_fails_closed() {
    let token = fixtures::github_token();
    let mut tap = StreamTap::new("m12", TapFraming::Spdy, None)
        .with_masking(&detectors())
        .expect("maskable");
    let mut client = SpdyEncoder::new().expect("encoder");
    let up = client
        .syn_stream(3, 0, &[("streamtype", "stdout\0stdin")])
        .unwrap();
    assert_eq!(tap.pass(Direction::ToServer, &up).unwrap(), None);
    let down = SpdyEncoder::data(3, format!("token: {token}\n").as_bytes(), false);
    let sent = tap.pass(Direction::ToClient, &down).unwrap().unwrap();
    let frames = SpdyDecoder::new().feed(&sent).expect("decodes");
    let payload: Vec<u8> = frames
        .iter()
        .filter_map(|f| match f {
            SpdyFrame::Data { payload, .. } => Some(payload.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(payload, b"token: **masked:github-token**\n");

    // A second SYN_STREAM for the stdout stream, calling it `error`, is refused by
    // spdystream (its id is not above the last one opened): stdout stays masked.
    let relabel = client.syn_stream(3, 0, &[("streamtype", "error")]).unwrap();
    assert_eq!(tap.pass(Direction::ToServer, &relabel).unwrap(), None);
    let sent = tap.pass(Direction::ToClient, &down).unwrap().unwrap();
    let frames = SpdyDecoder::new().feed(&sent).expect("decodes");
    assert!(
        frames.iter().all(|f| match f {
            SpdyFrame::Data { payload, .. } => !String::from_utf8_lossy(payload).contains(&token),
            _ => true,
        }),
        "stdout relabelled as error went out unmasked"
    );

    // A stream type the tap does not know, and a stream it never saw opened.
    for (streamtype, id) in [(Some("stdoot"), 5), (None, 7)] {
        let mut tap = StreamTap::new("m13", TapFraming::Spdy, None)
            .with_masking(&detectors())
            .expect("maskable");
        if let Some(kind) = streamtype {
            let mut client = SpdyEncoder::new().expect("encoder");
            let up = client.syn_stream(id, 0, &[("streamtype", kind)]).unwrap();
            assert_eq!(tap.pass(Direction::ToServer, &up).unwrap(), None);
        }
        let down = SpdyEncoder::data(id, format!("token: {token}\n").as_bytes(), false);
        assert!(
            tap.pass(Direction::ToClient, &down).is_err(),
            "output on stream {id} ({streamtype:?}) must end the session"
        );
    }
}

#[tokio::test]
async fn the_relay_flushes_a_held_prompt_within_the_hold_delay() {
    let (client, mut client_peer) = tokio::io::duplex(64 * 1024);
    let (upstream, mut upstream_peer) = tokio::io::duplex(64 * 1024);
    let tap = Mutex::new(
        StreamTap::new("m11", v5(), None)
            .with_masking(&detectors())
            .expect("maskable"),
    );
    let never = tokio_util::sync::CancellationToken::new();
    let relay = relay(client, upstream, &tap, &never);
    let token = fixtures::github_token();
    let peers = async {
        let started = std::time::Instant::now();
        upstream_peer
            .write_all(&ws_channel(1, b"$ "))
            .await
            .expect("write");
        let mut frame = [0u8; 5];
        client_peer.read_exact(&mut frame).await.expect("read");
        let waited = started.elapsed();
        assert_eq!(&frame, b"\x82\x03\x01$ ");
        assert!(
            waited >= EXEC_HOLD.max_delay && waited < EXEC_HOLD.max_delay * 10,
            "held {waited:?}"
        );
        // A token split over two writes is caught within the delay.
        let line = format!("{token}\n");
        let (a, b) = line.split_at(10);
        upstream_peer
            .write_all(&ws_channel(1, a.as_bytes()))
            .await
            .unwrap();
        upstream_peer
            .write_all(&ws_channel(1, b.as_bytes()))
            .await
            .unwrap();
        let want = ws_channel(1, b"**masked:github-token**\n");
        let mut got = vec![0u8; want.len()];
        client_peer.read_exact(&mut got).await.expect("read");
        assert_eq!(got, want);
        drop(client_peer);
        drop(upstream_peer);
    };
    let (error, ()) = tokio::join!(relay, peers);
    assert_eq!(error, None);
}
