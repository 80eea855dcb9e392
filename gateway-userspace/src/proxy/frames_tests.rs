use chaperone_testkit::spdy_frames::{SpdyEncoder, build_header_block};

use super::*;

fn feed_bytewise_ws(frames: &[u8]) -> Vec<WsMessage> {
    let mut d = WsDecoder::new();
    let mut out = Vec::new();
    for b in frames {
        out.extend(d.feed(std::slice::from_ref(b)).expect("decode"));
    }
    out
}

fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = ws_encode(WsOpcode::Binary, payload, mask);
    f[0] = if fin { 0x80 } else { 0 } | opcode;
    f
}

#[test]
fn websocket_messages_decode_in_any_chunking() {
    let mask = Some([0x11, 0x22, 0x33, 0x44]);
    let long = vec![7u8; 300];
    let huge = vec![9u8; 70_000];
    let cases: Vec<(&str, Vec<u8>, Vec<WsMessage>)> = vec![
        (
            "masked binary (client)",
            ws_encode(WsOpcode::Binary, b"\x00hello", mask),
            vec![WsMessage {
                opcode: WsOpcode::Binary,
                payload: b"\x00hello".to_vec(),
            }],
        ),
        (
            "unmasked binary (server)",
            ws_encode(WsOpcode::Binary, b"\x01out", None),
            vec![WsMessage {
                opcode: WsOpcode::Binary,
                payload: b"\x01out".to_vec(),
            }],
        ),
        (
            "16-bit length",
            ws_encode(WsOpcode::Binary, &long, mask),
            vec![WsMessage {
                opcode: WsOpcode::Binary,
                payload: long.clone(),
            }],
        ),
        (
            "64-bit length",
            ws_encode(WsOpcode::Binary, &huge, None),
            vec![WsMessage {
                opcode: WsOpcode::Binary,
                payload: huge.clone(),
            }],
        ),
        (
            "fragmented text with a ping in the middle",
            [
                frame(false, 0x1, b"hel", mask),
                ws_encode(WsOpcode::Ping, b"p", mask),
                frame(false, 0x0, b"lo ", mask),
                frame(true, 0x0, b"world", mask),
            ]
            .concat(),
            vec![
                WsMessage {
                    opcode: WsOpcode::Ping,
                    payload: b"p".to_vec(),
                },
                WsMessage {
                    opcode: WsOpcode::Text,
                    payload: b"hello world".to_vec(),
                },
            ],
        ),
        (
            "close with code 1000",
            ws_encode(WsOpcode::Close, &1000u16.to_be_bytes(), None),
            vec![WsMessage {
                opcode: WsOpcode::Close,
                payload: vec![0x03, 0xe8],
            }],
        ),
    ];
    for (name, bytes, want) in cases {
        let mut whole = WsDecoder::new();
        assert_eq!(whole.feed(&bytes).expect(name), want, "{name}: one chunk");
        assert_eq!(feed_bytewise_ws(&bytes), want, "{name}: byte by byte");
    }
}

#[test]
fn websocket_protocol_violations_stop_the_decoder() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("reserved bit (compression)", vec![0xC2, 0x00]),
        ("continuation without start", frame(true, 0x0, b"x", None)),
        ("unknown opcode", frame(true, 0x3, b"x", None)),
        ("fragmented control frame", frame(false, 0x9, b"x", None)),
        (
            "control frame over 125 bytes",
            frame(true, 0x9, &[0; 126], None),
        ),
        (
            "data frame inside a fragmented message",
            [frame(false, 0x2, b"a", None), frame(true, 0x2, b"b", None)].concat(),
        ),
        (
            "absurd length",
            [vec![0x82, 127], u64::MAX.to_be_bytes().to_vec()].concat(),
        ),
    ];
    for (name, bytes) in cases {
        let mut d = WsDecoder::new();
        let err = d.feed(&bytes).expect_err(name);
        assert!(matches!(err, FrameError::WebSocket(_)), "{name}: {err}");
        assert_eq!(d.feed(b"\x82\x00"), Err(FrameError::Stopped), "{name}");
    }
}

#[test]
fn spdy_dictionary_is_the_spdy3_one() {
    let d = spdy_dictionary();
    assert_eq!(d.len(), 1423);
    assert_eq!(&d[..11], b"\x00\x00\x00\x07options");
    assert!(d.ends_with(b",enq=0."));
}

#[test]
fn spdy_session_round_trips_through_one_zlib_context_per_direction() {
    let mut enc = SpdyEncoder::new().expect("encoder");
    let mut bytes = Vec::new();
    let streams = [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")];
    for (id, kind) in streams {
        bytes.extend(
            enc.syn_stream(id, 0, &[("streamType", kind), ("port", "8080")])
                .expect("syn"),
        );
    }
    bytes.extend(SpdyEncoder::data(3, b"input", false));
    bytes.extend(SpdyEncoder::data(3, b"", true));
    bytes.extend(SpdyEncoder::ping(1));
    bytes.extend(enc.syn_reply(9, SPDY_FLAG_FIN, &[]).expect("reply"));
    bytes.extend(SpdyEncoder::rst_stream(5, 5));
    bytes.extend(SpdyEncoder::goaway(7));

    let mut want: Vec<SpdyFrame> = streams
        .iter()
        .map(|(id, kind)| SpdyFrame::SynStream {
            id: *id,
            associated: 0,
            flags: 0,
            headers: vec![
                ("streamtype".to_owned(), (*kind).to_owned()),
                ("port".to_owned(), "8080".to_owned()),
            ],
        })
        .collect();
    want.extend([
        SpdyFrame::Data {
            id: 3,
            flags: 0,
            payload: b"input".to_vec(),
        },
        SpdyFrame::Data {
            id: 3,
            flags: SPDY_FLAG_FIN,
            payload: vec![],
        },
        SpdyFrame::Ping(1),
        SpdyFrame::SynReply {
            id: 9,
            flags: SPDY_FLAG_FIN,
            headers: vec![],
        },
        SpdyFrame::RstStream { id: 5, status: 5 },
        SpdyFrame::GoAway {
            last_good: 7,
            status: 0,
        },
    ]);

    let mut whole = SpdyDecoder::new();
    assert_eq!(whole.feed(&bytes).expect("decode"), want, "one chunk");
    for chunk in [1, 3, 7, 64] {
        let mut d = SpdyDecoder::new();
        let mut got = Vec::new();
        for c in bytes.chunks(chunk) {
            got.extend(d.feed(c).expect("decode"));
        }
        assert_eq!(got, want, "chunks of {chunk}");
    }
    // The second header block depends on the first: a fresh context cannot read it.
    let second_syn_start = {
        let len = |at: usize| {
            8 + ((usize::from(bytes[at + 5]) << 16)
                | (usize::from(bytes[at + 6]) << 8)
                | usize::from(bytes[at + 7]))
        };
        len(0)
    };
    let mut fresh = SpdyDecoder::new();
    assert!(
        fresh.feed(&bytes[second_syn_start..]).is_err(),
        "a header block decoded without the session's zlib history"
    );
}

#[test]
fn spdy_data_frames_split_at_the_length_limit() {
    let payload = vec![1u8; 0x00ff_ffff + 10];
    let bytes = SpdyEncoder::data(5, &payload, true);
    let frames = SpdyDecoder::new().feed(&bytes).expect("decode");
    assert_eq!(frames.len(), 2);
    assert!(!frames[0].fin() && frames[1].fin());
}

#[test]
fn spdy_garbage_is_an_error_never_a_panic() {
    let mut enc = SpdyEncoder::new().expect("encoder");
    let mut corrupt = enc
        .syn_stream(1, 0, &[("streamtype", "error")])
        .expect("syn");
    let last = corrupt.len() - 3;
    corrupt[last] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("SPDY/2 control frame", vec![0x80, 0x02, 0, 1, 0, 0, 0, 0]),
        ("corrupt header block", corrupt),
        (
            "truncated SYN_STREAM body",
            vec![0x80, 0x03, 0, 1, 0, 0, 0, 2, 0, 0],
        ),
        (
            "header block that is not zlib",
            [
                vec![0x80, 0x03, 0, 2, 0, 0, 0, 8, 0, 0, 0, 1],
                b"junk".to_vec(),
            ]
            .concat(),
        ),
    ];
    for (name, bytes) in cases {
        let mut d = SpdyDecoder::new();
        assert!(d.feed(&bytes).is_err(), "{name}");
        assert_eq!(d.feed(&[0; 8]), Err(FrameError::Stopped), "{name}");
    }
    // Pseudo-random input: any outcome but a panic.
    let mut x: u32 = 0x1234_5678;
    for _ in 0..200 {
        let bytes: Vec<u8> = (0..512)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let _ = SpdyDecoder::new().feed(&bytes);
        let _ = WsDecoder::new().feed(&bytes);
    }
}

#[test]
fn header_blocks_parse_and_reject_truncation() {
    let block = build_header_block(&[("StreamType", "data"), ("requestID", "0")]);
    assert_eq!(
        parse_header_block(&block).expect("parse"),
        vec![
            ("streamtype".to_owned(), "data".to_owned()),
            ("requestid".to_owned(), "0".to_owned())
        ]
    );
    for cut in [2, 6, block.len() - 1] {
        assert!(parse_header_block(&block[..cut]).is_err(), "cut at {cut}");
    }
    assert!(parse_header_block(&[0xff, 0xff, 0xff, 0xff]).is_err());
}
