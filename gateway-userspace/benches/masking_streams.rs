//! Credential detectors and the pod-log line masker on 10 MiB of log text (design target:
//! masking at 200 MB/s per core or more).
//!
//! The text is what a busy service logs: access lines, structured `key=value` lines, one
//! line in ten with an `https://` URL and one in fifty with the word "token", so keyword
//! prefiltering sees its keywords now and then rather than never. The "secrets" variant
//! puts a credential on every hundredth line (a GitHub token, a JWT, a `password=`, an AWS
//! key id, a database URL, a PEM private key, in turn).
//!
//! `detect/*` runs `Detectors::redact_bytes` over 64 KiB pieces cut at newlines; `line_masker/*` feeds
//! a `LineMasker` the text in 16 KiB reads cut anywhere, as a `kubectl logs -f` response
//! arrives.

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{fmt::Write as _, hint::black_box};

use base64::Engine as _;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gateway_userspace::masking::{
    detect::{Detectors, DetectorsSpec},
    stream::{LOG_HOLD, LineMasker},
};

const SIZE: usize = 10 << 20;

/// A small deterministic generator, so every run masks the same text.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn secret(n: usize) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    match n % 6 {
        0 => format!(
            "GITHUB_TOKEN={}",
            ["gh", "p_u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8d"].concat()
        ),
        1 => format!(
            "authorization: Bearer {}.{}.c2lnbmF0dXJlLW5vdC1yZWFs",
            b64(r#"{"alg":"RS256","kid":"k1"}"#),
            b64(r#"{"sub":"system:serviceaccount:agents:cursor"}"#)
        ),
        2 => "connecting with password=Tr0ub4dor&3x".to_owned(),
        3 => format!("s3 client key {}", ["AK", "IAUVW75EFR6EDT4SYW"].concat()),
        4 => "dsn=postgres://app:Sup3rS3cret@db.internal:5432/orders".to_owned(),
        _ => [
            "-----BEGIN RSA ",
            "PRIVATE KEY-----\n",
            "ml15Hx3ZfP76d3p7TxUkGr9XvUN61LEphAU08/OHXCWwi+oGwodM+qTdF7LYQoRd\n",
            "6CpbxTmIiseAVKI5nM/J/MLaMc490Wa9zTozhH5buwf9B8pHeEIxsZr0WHLO77n8\n",
            "-----END RSA PRIVATE KEY-----",
        ]
        .concat(),
    }
}

fn log_text(with_secrets: bool) -> Vec<u8> {
    let mut rng = Lcg(42);
    let mut text = String::with_capacity(SIZE + 1024);
    let mut line = 0usize;
    while text.len() < SIZE {
        line += 1;
        let ms = rng.next() % 1000;
        let id = rng.next();
        let _ = match line % 10 {
            _ if with_secrets && line.is_multiple_of(100) => {
                writeln!(
                    text,
                    "2026-12-01T10:00:00.{ms:03}Z WARN  {}",
                    secret(line / 100)
                )
            }
            3 => writeln!(
                text,
                "2026-12-01T10:00:00.{ms:03}Z INFO  upstream call url=https://api.internal.example/v1/orders/{id} status=200 took={}ms",
                rng.next() % 500
            ),
            5 if line % 50 == 5 => writeln!(
                text,
                "2026-12-01T10:00:00.{ms:03}Z DEBUG token refreshed for session {id:x}, next refresh in 300s"
            ),
            7 => writeln!(
                text,
                "level=info ts=2026-12-01T10:00:00.{ms:03}Z caller=reconcile.go:142 msg=\"reconciled\" controller=deployment namespace=default name=web-{} generation={}",
                id % 97,
                rng.next() % 10_000
            ),
            _ => writeln!(
                text,
                "10.244.{}.{} - - [01/Dec/2026:10:00:00 +0000] \"GET /api/v1/users/{} HTTP/1.1\" 200 {} \"-\" \"kubectl/v1.32.0 (linux/amd64) kubernetes/abcdef0\" rid={id:016x}",
                id % 256,
                rng.next() % 256,
                rng.next() % 100_000,
                rng.next() % 20_000
            ),
        };
    }
    text.into_bytes()
}

/// 64 KiB pieces that end at a newline.
fn pieces(text: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let cut = rest.len().min(64 * 1024);
        let end = rest[..cut]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(cut, |i| i + 1);
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

fn bench(c: &mut Criterion) {
    let detectors = Detectors::compile(&DetectorsSpec::default()).expect("detectors");
    let mut group = c.benchmark_group("masking_streams");
    group.sample_size(10);
    for (name, secrets) in [("clean", false), ("secrets", true)] {
        let text = log_text(secrets);
        group.throughput(Throughput::Bytes(text.len() as u64));
        let parts = pieces(&text);
        group.bench_function(format!("detect/{name}"), |b| {
            b.iter(|| {
                let mut hits = Vec::new();
                let mut n = 0;
                for p in &parts {
                    n += detectors.redact_bytes(black_box(p), &mut hits).len();
                }
                black_box((n, hits))
            })
        });
        group.bench_function(format!("line_masker/{name}"), |b| {
            b.iter(|| {
                let mut masker = LineMasker::new(detectors.clone(), LOG_HOLD.max_bytes);
                let mut out = Vec::with_capacity(16 * 1024 + 1024);
                let mut n = 0;
                for chunk in text.chunks(16 * 1024) {
                    out.clear();
                    masker.push(black_box(chunk), &mut out);
                    n += out.len();
                }
                out.clear();
                masker.flush(&mut out);
                black_box((n + out.len(), masker.masked()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
