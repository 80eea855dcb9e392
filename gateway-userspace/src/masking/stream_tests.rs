use super::*;
use crate::masking::detect::{DetectorsSpec, tests::fixtures};

fn detectors() -> Detectors {
    Detectors::compile(&DetectorsSpec::default()).expect("built-in detectors")
}

/// Feeds `input` in chunks of `size` bytes and returns everything emitted plus what was
/// emitted before the final flush.
fn run(input: &[u8], size: usize, max_line: usize) -> (Vec<u8>, LineMasker) {
    let mut m = LineMasker::new(detectors(), max_line);
    let mut out = Vec::new();
    for chunk in input.chunks(size.max(1)) {
        m.push(chunk, &mut out);
    }
    m.flush(&mut out);
    (out, m)
}

fn log_with_secrets() -> (String, String) {
    let token = fixtures::github_token();
    let input = format!(
        "starting\nGITHUB_TOKEN={token}\nkey follows\n{}after the key\nAuthorization: Bearer {}\nno newline at the end",
        fixtures::pem_key(),
        fixtures::jwt(),
    );
    let want = "starting\nGITHUB_TOKEN=**masked:github-token**\nkey follows\n**masked:pem-private-key**\nafter the key\nAuthorization: Bearer **masked:jwt**\nno newline at the end".to_owned();
    (input, want)
}

#[test]
fn secrets_split_across_any_chunking_are_masked() {
    let (input, want) = log_with_secrets();
    for size in [1, 2, 3, 7, 16, 64, 100, 4096] {
        let (out, m) = run(input.as_bytes(), size, LOG_HOLD.max_bytes);
        assert_eq!(String::from_utf8_lossy(&out), want, "chunks of {size}");
        assert_eq!(m.masked(), 3, "chunks of {size}: {:?}", m.hits());
    }
}

#[test]
fn complete_lines_are_emitted_at_once_and_partial_lines_held() {
    let mut m = LineMasker::new(detectors(), 1024);
    let mut out = Vec::new();
    m.push(b"first line\nsecond li", &mut out);
    assert_eq!(out, b"first line\n");
    assert_eq!(m.pending(), 9);
    assert!(m.deadline(EXEC_HOLD.max_delay).is_some());
    m.push(b"ne\n", &mut out);
    assert_eq!(out, b"first line\nsecond line\n");
    assert_eq!(m.pending(), 0);
    assert!(m.deadline(EXEC_HOLD.max_delay).is_none());
}

#[test]
fn a_pem_block_is_dropped_without_holding_lines() {
    let mut m = LineMasker::new(detectors(), 1024);
    let mut out = Vec::new();
    let key = fixtures::pem_key();
    let mut lines = key.split_inclusive('\n');
    m.push(b"before\n", &mut out);
    m.push(lines.next().unwrap().as_bytes(), &mut out);
    // The marker is out as soon as the BEGIN line is; body lines add nothing.
    assert_eq!(out, b"before\n**masked:pem-private-key**");
    for line in lines {
        m.push(line.as_bytes(), &mut out);
        assert_eq!(m.pending(), 0);
    }
    m.push(b"after\n", &mut out);
    assert_eq!(out, b"before\n**masked:pem-private-key**\nafter\n");
    // Flushed mid-block (a timeout), the rest of the block is still dropped.
    let mut m = LineMasker::new(detectors(), 1024);
    let mut out = Vec::new();
    let (head, tail) = key.split_at(60);
    m.push(head.as_bytes(), &mut out);
    m.flush(&mut out);
    m.push(tail.as_bytes(), &mut out);
    m.push(b"after\n", &mut out);
    assert_eq!(out, b"**masked:pem-private-key**\nafter\n");
}

#[test]
fn an_unterminated_pem_block_ends_at_its_bound() {
    let mut input = b"-----BEGIN PRIVATE KEY-----\n".to_vec();
    let body = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2\n";
    while input.len() < PEM_MAX_BLOCK + 1024 {
        input.extend_from_slice(body.as_bytes());
    }
    input.extend_from_slice(b"life goes on\n");
    let (out, _) = run(&input, 4096, LOG_HOLD.max_bytes);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("**masked:pem-private-key**\n"),
        "{text:.80}"
    );
    assert!(text.ends_with("life goes on\n"));
    assert!(out.len() < 2048, "the block up to the bound is dropped");
}

#[test]
fn a_huge_line_is_emitted_in_bounded_pieces_and_still_masked() {
    let token = fixtures::github_token();
    // 1 MiB on one line: words with a token every ~10 KiB.
    let mut line = String::new();
    let mut n = 0;
    while line.len() < 1 << 20 {
        line.push_str("lorem ipsum dolor sit amet ");
        n += 1;
        if n % 400 == 0 {
            line.push_str(&token);
            line.push(' ');
        }
    }
    let tokens = line.matches(token.as_str()).count();
    let mut m = LineMasker::new(detectors(), 4096);
    let mut out = Vec::new();
    let mut max_pending = 0;
    for chunk in line.as_bytes().chunks(1000) {
        m.push(chunk, &mut out);
        max_pending = max_pending.max(m.pending());
    }
    assert!(max_pending <= 4096 + 1000, "held {max_pending} bytes");
    assert!(out.len() > 1 << 19, "emitted while the line is still going");
    m.push(b"\n", &mut out);
    let text = String::from_utf8(out).expect("utf-8");
    assert!(!text.contains(&token[4..]), "a token leaked");
    assert_eq!(text.matches("**masked:github-token**").count(), tokens);
}

#[test]
fn binary_and_invalid_utf8_pass_unchanged() {
    let mut input: Vec<u8> = (0..=255u8).cycle().take(256 * 1024).collect();
    input.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28, b'\n', 0x80]);
    for size in [1, 500, 65536] {
        let (out, m) = run(&input, size, EXEC_HOLD.max_bytes);
        assert_eq!(out, input, "chunks of {size}");
        assert_eq!(m.masked(), 0);
    }
    // A token in the middle of binary data is masked; the bytes around it are not touched.
    let token = fixtures::github_token();
    let mut input: Vec<u8> = vec![0x00, 0xff, 0x10];
    input.extend_from_slice(token.as_bytes());
    input.extend_from_slice(&[0x00, 0xfe]);
    let (out, _) = run(&input, 5, EXEC_HOLD.max_bytes);
    let mut want = vec![0x00, 0xff, 0x10];
    want.extend_from_slice(b"**masked:github-token**");
    want.extend_from_slice(&[0x00, 0xfe]);
    assert_eq!(out, want);
}

#[test]
fn without_detectors_everything_passes() {
    let mut m = LineMasker::new(Detectors::default(), 16);
    let mut out = Vec::new();
    let (input, _) = log_with_secrets();
    for chunk in input.as_bytes().chunks(5) {
        m.push(chunk, &mut out);
    }
    m.flush(&mut out);
    assert_eq!(out, input.as_bytes());
}
