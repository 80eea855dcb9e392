use super::*;
use chaperone_testkit::spdy_frames::SpdyEncoder;

use crate::proxy::frames::ws_encode;

#[test]
fn upgrade_requests_are_recognised() {
    type Case = (
        &'static str,
        http::Version,
        &'static [(&'static str, &'static str)],
        Option<UpgradeProtocol>,
    );
    let cases: [Case; 7] = [
        (
            "websocket",
            http::Version::HTTP_11,
            &[("connection", "Upgrade"), ("upgrade", "websocket")],
            Some(UpgradeProtocol::WebSocket),
        ),
        (
            "spdy, mixed case, token list",
            http::Version::HTTP_11,
            &[
                ("connection", "keep-alive, upgrade"),
                ("upgrade", "SPDY/3.1"),
            ],
            Some(UpgradeProtocol::Spdy),
        ),
        (
            "no Connection: Upgrade",
            http::Version::HTTP_11,
            &[("upgrade", "websocket")],
            None,
        ),
        (
            "no Upgrade header",
            http::Version::HTTP_11,
            &[("connection", "Upgrade")],
            None,
        ),
        (
            "h2c is not relayed",
            http::Version::HTTP_11,
            &[("connection", "Upgrade"), ("upgrade", "h2c")],
            None,
        ),
        (
            "HTTP/2 has no upgrade",
            http::Version::HTTP_2,
            &[("connection", "Upgrade"), ("upgrade", "websocket")],
            None,
        ),
        (
            "HTTP/1.0",
            http::Version::HTTP_10,
            &[("connection", "Upgrade"), ("upgrade", "websocket")],
            None,
        ),
    ];
    for (name, version, headers, want) in cases {
        let mut b = Request::builder().version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(()).expect("request");
        assert_eq!(upgrade_protocol(&req), want, "{name}");
    }
}

/// Only targets the API server upgrades are forwarded as upgrades: the upgrade path relays
/// the answer as it comes, past the body's inspection and the response's masking.
#[test]
fn only_exec_attach_portforward_and_proxy_are_upgraded() {
    for (path, want) in [
        ("/api/v1/namespaces/d/pods/p/exec?command=sh", true),
        ("/api/v1/namespaces/d/pods/p/attach", true),
        ("/api/v1/namespaces/d/pods/p/portforward?ports=80", true),
        ("/api/v1/namespaces/d/pods/p:8080/proxy/ws", true),
        ("/api/v1/namespaces/d/services/s/proxy/", true),
        ("/api/v1/nodes/n/proxy/stats", true),
        ("/api/v1/namespaces/d/secrets/s", false),
        ("/api/v1/namespaces/d/secrets?watch=true", false),
        ("/api/v1/namespaces/d/pods/p/log?follow=true", false),
        ("/api/v1/namespaces/d/pods/p", false),
        ("/apis/apps/v1/namespaces/d/deployments/x/exec", false),
        ("/healthz", false),
    ] {
        let uri: http::Uri = path.parse().expect("uri");
        let info = RequestInfo::parse(&http::Method::GET, &uri).expect("request info");
        assert_eq!(upgrades(&info), want, "{path}");
    }
}

fn response_with_protocol(p: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_str(p).expect("value"),
    );
    h
}

#[test]
fn framing_follows_the_negotiated_protocol() {
    let cases = [
        (
            UpgradeProtocol::WebSocket,
            "exec",
            None,
            "v5.channel.k8s.io",
            TapFraming::WebSocketChannels {
                base64: false,
                ports: None,
            },
        ),
        (
            UpgradeProtocol::WebSocket,
            "exec",
            None,
            "v4.base64.channel.k8s.io",
            TapFraming::WebSocketChannels {
                base64: true,
                ports: None,
            },
        ),
        (
            UpgradeProtocol::WebSocket,
            "portforward",
            None,
            "SPDY/3.1+portforward.k8s.io",
            TapFraming::WebSocketSpdyTunnel,
        ),
        (
            UpgradeProtocol::WebSocket,
            "portforward",
            Some("ports=8080,9090"),
            "v4.channel.k8s.io",
            TapFraming::WebSocketChannels {
                base64: false,
                ports: Some(vec![8080, 9090]),
            },
        ),
        (
            UpgradeProtocol::WebSocket,
            "exec",
            None,
            "something.else",
            TapFraming::Opaque,
        ),
        (UpgradeProtocol::Spdy, "exec", None, "", TapFraming::Spdy),
    ];
    for (protocol, sub, query, negotiated, want) in cases {
        assert_eq!(
            TapFraming::detect(protocol, sub, query, &response_with_protocol(negotiated)),
            want,
            "{negotiated}"
        );
    }
}

#[derive(Default)]
struct Recording(Mutex<Vec<(Direction, String, Vec<u8>)>>);

impl FrameSink for Recording {
    fn frame(&self, e: &FrameEvent<'_>) {
        self.0
            .lock()
            .expect("lock")
            .push((e.direction, e.channel.name(), e.payload.to_vec()));
    }
}

fn events(sink: &Recording) -> Vec<(Direction, String, Vec<u8>)> {
    sink.0.lock().expect("lock").clone()
}

#[test]
fn websocket_exec_frames_are_attributed_to_channels() {
    let sink = Arc::new(Recording::default());
    let framing = TapFraming::WebSocketChannels {
        base64: false,
        ports: None,
    };
    let mut tap = StreamTap::new("a1", framing, Some(sink.clone()));
    let m = Some([1, 2, 3, 4]);
    let client = [
        ws_encode(WsOpcode::Binary, b"\x04{\"Width\":80,\"Height\":24}\n", m),
        ws_encode(WsOpcode::Binary, b"\x00ls\n", m),
        ws_encode(WsOpcode::Binary, &[255, 0], m),
        ws_encode(WsOpcode::Ping, b"", m),
    ]
    .concat();
    let server = [
        ws_encode(WsOpcode::Binary, b"\x01", None),
        ws_encode(WsOpcode::Binary, b"\x01file\n", None),
        ws_encode(WsOpcode::Binary, b"\x03{\"status\":\"Success\"}", None),
        ws_encode(WsOpcode::Close, &[0x03, 0xe8], None),
    ]
    .concat();
    // Split mid-frame on purpose.
    tap.feed(Direction::ToServer, &client[..5]);
    tap.feed(Direction::ToClient, &server[..3]);
    tap.feed(Direction::ToServer, &client[5..]);
    tap.feed(Direction::ToClient, &server[3..]);
    let want = vec![
        (
            Direction::ToServer,
            "resize".to_owned(),
            b"{\"Width\":80,\"Height\":24}\n".to_vec(),
        ),
        (Direction::ToClient, "stdout".to_owned(), vec![]),
        (Direction::ToServer, "stdin".to_owned(), b"ls\n".to_vec()),
        (Direction::ToServer, "close".to_owned(), vec![0]),
        (Direction::ToClient, "stdout".to_owned(), b"file\n".to_vec()),
        (
            Direction::ToClient,
            "error".to_owned(),
            b"{\"status\":\"Success\"}".to_vec(),
        ),
    ];
    let mut got = events(&sink);
    let mut want = want;
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let s = tap.stats();
    assert_eq!((s.frames_to_server, s.frames_to_client), (3, 3));
    assert_eq!(s.control_frames, 2, "ping and close");
    assert_eq!(s.bytes_to_server, client.len() as u64);
    assert_eq!(s.bytes_to_client, server.len() as u64);
    assert_eq!(s.payload("stdin", Direction::ToServer), 3);
    assert_eq!(s.decode_error, None);
}

#[test]
fn websocket_portforward_channels_map_to_ports() {
    let sink = Arc::new(Recording::default());
    let framing = TapFraming::WebSocketChannels {
        base64: false,
        ports: Some(vec![8080, 9090]),
    };
    let mut tap = StreamTap::new("a2", framing, Some(sink.clone()));
    tap.feed(
        Direction::ToClient,
        &[
            ws_encode(WsOpcode::Binary, &[2, 0x82, 0x23], None),
            ws_encode(WsOpcode::Binary, b"\x03refused", None),
        ]
        .concat(),
    );
    tap.feed(
        Direction::ToServer,
        &ws_encode(WsOpcode::Binary, b"\x00GET /", Some([9, 9, 9, 9])),
    );
    let names: Vec<String> = events(&sink).into_iter().map(|(_, n, _)| n).collect();
    assert_eq!(
        names,
        [
            "portforward-data:9090",
            "portforward-error:9090",
            "portforward-data:8080"
        ]
    );
}

#[test]
fn spdy_streams_are_attributed_by_streamtype_across_directions() {
    let sink = Arc::new(Recording::default());
    let mut tap = StreamTap::new("a3", TapFraming::Spdy, Some(sink.clone()));
    let mut client = SpdyEncoder::new().expect("encoder");
    let mut server = SpdyEncoder::new().expect("encoder");
    let mut up = Vec::new();
    for (id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout")] {
        up.extend(
            client
                .syn_stream(id, 0, &[("streamtype", kind)])
                .expect("syn"),
        );
    }
    up.extend(SpdyEncoder::data(3, b"typed", false));
    up.extend(SpdyEncoder::data(3, b"", true));
    let mut down = Vec::new();
    for id in [1, 3, 5] {
        down.extend(server.syn_reply(id, 0, &[]).expect("reply"));
    }
    down.extend(SpdyEncoder::data(5, b"printed", false));
    down.extend(SpdyEncoder::data(1, b"{\"status\":\"Success\"}", true));
    down.extend(SpdyEncoder::ping(1));
    for c in up.chunks(5) {
        tap.feed(Direction::ToServer, c);
    }
    for c in down.chunks(7) {
        tap.feed(Direction::ToClient, c);
    }
    let got: Vec<(Direction, String)> = events(&sink).into_iter().map(|(d, n, _)| (d, n)).collect();
    assert_eq!(
        got,
        [
            (Direction::ToServer, "stdin".to_owned()),
            (Direction::ToClient, "stdout".to_owned()),
            (Direction::ToClient, "error".to_owned()),
        ]
    );
    assert_eq!(tap.stats().decode_error, None);
    assert_eq!(tap.stats().payload("stdout", Direction::ToClient), 7);
}

#[test]
fn port_forward_streams_are_forgotten_once_reset_or_closed_both_ways() {
    // kubectl port-forward opens an error and a data stream per connection it forwards,
    // then closes the error stream both ways and resets the data stream.
    let sink = Arc::new(Recording::default());
    let mut tap = StreamTap::new("a3p", TapFraming::Spdy, Some(sink.clone()));
    let mut client = SpdyEncoder::new().expect("encoder");
    let mut server = SpdyEncoder::new().expect("encoder");
    let headers = |kind: &'static str, n: u32| {
        let id = n.to_string();
        [
            ("streamtype", kind.to_owned()),
            ("port", "8080".to_owned()),
            ("requestid", id),
        ]
    };
    for n in 0..2_000u32 {
        let (error, data) = (4 * n + 1, 4 * n + 3);
        let mut up = Vec::new();
        for (id, kind) in [(error, "error"), (data, "data")] {
            let h = headers(kind, n);
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            up.extend(client.syn_stream(id, 0, &h).expect("syn"));
        }
        up.extend(SpdyEncoder::data(error, b"", true));
        up.extend(SpdyEncoder::data(data, b"GET / HTTP/1.1\r\n\r\n", false));
        tap.feed(Direction::ToServer, &up);
        let mut down = server.syn_reply(error, 0, &[]).expect("reply");
        down.extend(server.syn_reply(data, 0, &[]).expect("reply"));
        down.extend(SpdyEncoder::data(data, b"HTTP/1.1 200 OK\r\n\r\n", false));
        down.extend(SpdyEncoder::data(error, b"", true));
        tap.feed(Direction::ToClient, &down);
        tap.feed(Direction::ToServer, &SpdyEncoder::rst_stream(data, 5));
    }
    // A stream opened half-closed (FIN on SYN_STREAM) and answered so (FIN on SYN_REPLY).
    let h = headers("error", 2_000);
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let syn = client.syn_stream(9_001, 0x01, &h).expect("syn");
    tap.feed(Direction::ToServer, &syn);
    assert_eq!(tap.spdy_streams_held(), (1, 1));
    tap.feed(
        Direction::ToClient,
        &server.syn_reply(9_001, 0x01, &[]).expect("reply"),
    );
    assert_eq!(tap.stats().decode_error, None);
    assert_eq!(tap.spdy_streams_held(), (0, 0), "every stream was closed");
    // Everything was still attributed while it was open.
    assert_eq!(
        tap.stats()
            .payload("portforward-data:8080", Direction::ToClient),
        2_000 * 19
    );
    assert_eq!(tap.stats().payload("unknown", Direction::ToServer), 0);
    // Exec's streams keep their labels whatever is reset: stdout stays masked as stdout.
    let mut up = client
        .syn_stream(10_001, 0, &[("streamtype", "stdout")])
        .expect("syn");
    up.extend(SpdyEncoder::rst_stream(10_001, 5));
    tap.feed(Direction::ToServer, &up);
    assert_eq!(tap.spdy_streams_held(), (1, 0));
    drop(sink);
}

#[test]
fn data_on_streams_never_opened_share_one_total() {
    // Every DATA frame on a new id: the totals stay one entry, not one per id.
    let mut tap = StreamTap::new("a3u", TapFraming::Spdy, None);
    let flood: Vec<u8> = (1..=5_000u32)
        .flat_map(|id| SpdyEncoder::data(id * 2 + 1, b"x", false))
        .collect();
    tap.feed(Direction::ToServer, &flood);
    assert_eq!(tap.stats().decode_error, None);
    assert_eq!(tap.stats().frames_to_server, 5_000);
    assert_eq!(
        tap.stats().payload_bytes.len(),
        1,
        "{:?}",
        &tap.stats().payload_bytes[..3]
    );
    assert_eq!(tap.stats().payload("unknown", Direction::ToServer), 5_000);
}

#[test]
fn spdy_inside_websocket_tunnel_is_decoded_across_messages() {
    let sink = Arc::new(Recording::default());
    let mut tap = StreamTap::new("a4", TapFraming::WebSocketSpdyTunnel, Some(sink.clone()));
    let mut client = SpdyEncoder::new().expect("encoder");
    let mut spdy = client
        .syn_stream(
            1,
            0,
            &[("streamtype", "data"), ("port", "80"), ("requestid", "0")],
        )
        .expect("syn");
    spdy.extend(SpdyEncoder::data(1, b"hello", false));
    // Message boundaries fall in the middle of SPDY frames.
    let ws: Vec<u8> = spdy
        .chunks(3)
        .flat_map(|c| ws_encode(WsOpcode::Binary, c, Some([5, 6, 7, 8])))
        .collect();
    tap.feed(Direction::ToServer, &ws);
    assert_eq!(
        events(&sink),
        [(
            Direction::ToServer,
            "portforward-data:80".to_owned(),
            b"hello".to_vec()
        )]
    );
}

#[tokio::test]
async fn garbage_stops_decoding_but_never_the_relay() {
    let (client, mut client_peer) = tokio::io::duplex(1024);
    let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
    let tap = Mutex::new(StreamTap::new(
        "a5",
        TapFraming::Spdy,
        None::<Arc<dyn FrameSink>>,
    ));
    let never = tokio_util::sync::CancellationToken::new();
    let relay = relay(client, upstream, &tap, &never);
    let peers = async {
        // A SPDY/2 control frame: the tap gives up at once.
        let garbage = b"\x80\x02\x00\x01\x00\x00\x00\x00not spdy".repeat(50);
        client_peer.write_all(&garbage).await.expect("write");
        let mut got = vec![0u8; garbage.len()];
        upstream_peer.read_exact(&mut got).await.expect("read");
        assert_eq!(got, garbage, "relayed unchanged");
        upstream_peer.write_all(b"reply").await.expect("write");
        let mut reply = [0u8; 5];
        client_peer.read_exact(&mut reply).await.expect("read");
        assert_eq!(&reply, b"reply");
        drop(client_peer);
        drop(upstream_peer);
    };
    let (error, ()) = tokio::join!(relay, peers);
    assert_eq!(error, None);
    let tap = tap.into_inner().expect("tap");
    let s = tap.stats();
    assert!(s.decode_error.is_some(), "{s:?}");
    assert_eq!(s.bytes_to_server, 50 * 16);
    assert_eq!(s.bytes_to_client, 5);
}
