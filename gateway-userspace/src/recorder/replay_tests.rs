use super::*;

fn ts(text: &str) -> jiff::Timestamp {
    text.parse()
        .unwrap_or_else(|e| panic!("bad timestamp {text}: {e}"))
}

fn out(seq: i64, offset_us: i64, stream: &str, data: &[u8]) -> ExecFrameRecord {
    ExecFrameRecord {
        session_id: "s".into(),
        audit_id: "s".into(),
        seq,
        time: ts("2026-12-03T10:00:00Z") + jiff::SignedDuration::from_micros(offset_us),
        offset_us,
        event: FrameEventKind::Frame,
        direction: Some(if stream == "stdin" || stream == "resize" {
            "to_server"
        } else {
            "to_client"
        }),
        stream: Some(stream.into()),
        data: Some(data.to_vec()),
        size: data.len() as i64,
        ..ExecFrameRecord::default()
    }
}

fn session() -> Vec<ExecFrameRecord> {
    vec![
        out(0, 0, "resize", br#"{"Width":100,"Height":30}"#),
        out(1, 10, "stdin", b"ls\r"),
        out(2, 20_000, "stdout", b"ls\r\n\xc3"),
        out(3, 30_000, "stdout", b"\xa9t\xe9\r\n$ "),
        out(4, 40_000, "stderr", b"warn\r\n"),
    ]
}

#[test]
fn replay_plays_output_only_with_requests_interleaved() {
    let frames = session();
    let refs: Vec<&ExecFrameRecord> = frames.iter().collect();
    let request = RequestRecord {
        request_time: ts("2026-12-03T10:00:00.035Z"),
        verb: crate::request::Verb::Create,
        response_code: 201,
        ..RequestRecord::default()
    };
    let events = replay_events(&refs, &[&request]);
    let mut played = Vec::new();
    play(
        &events,
        PlayOptions {
            speed: 1.0,
            no_wait: true,
            max_pause: Duration::from_secs(1),
        },
        &mut played,
    )
    .unwrap_or_else(|e| panic!("play: {e}"));
    let line = request_line(&request);
    let mut expected = b"ls\r\n\xc3\xa9t\xe9\r\n$ ".to_vec();
    expected.extend_from_slice(format!("\r\n{line}\r\n").as_bytes());
    expected.extend_from_slice(b"warn\r\n");
    assert_eq!(played, expected);

    let without: Vec<u8> = {
        let mut v = Vec::new();
        let events = replay_events(&refs, &[]);
        play(
            &events,
            PlayOptions {
                speed: 100.0,
                no_wait: false,
                max_pause: Duration::from_millis(5),
            },
            &mut v,
        )
        .unwrap_or_else(|e| panic!("play: {e}"));
        v
    };
    assert_eq!(without, b"ls\r\n\xc3\xa9t\xe9\r\n$ warn\r\n");
}

#[test]
fn asciicast_has_a_header_and_never_splits_a_character() {
    let frames = session();
    let refs: Vec<&ExecFrameRecord> = frames.iter().collect();
    let cast = asciicast(&replay_events(&refs, &[]), "t", ts("2026-12-03T10:00:00Z"));
    let lines: Vec<serde_json::Value> = cast
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(lines[0]["version"], 2);
    assert_eq!(
        (lines[0]["width"].clone(), lines[0]["height"].clone()),
        (100.into(), 30.into())
    );
    assert_eq!(lines[0]["timestamp"], 1_796_292_000);
    let events: Vec<(f64, String, String)> = lines[1..]
        .iter()
        .map(|l| {
            (
                l[0].as_f64().unwrap_or(-1.0),
                l[1].as_str().unwrap_or("").to_owned(),
                l[2].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        events,
        vec![
            (0.0, "r".into(), "100x30".into()),
            (0.02, "o".into(), "ls\r\n".into()),
            (0.03, "o".into(), "\u{e9}t\u{fffd}\r\n$ ".into()),
            (0.04, "o".into(), "warn\r\n".into()),
        ]
    );
}
