//! The per-request cost of putting the gateway's credential on an upstream request.
//!
//! `cached` is what the request path does: load the snapshot the control-plane refresh
//! publishes and insert the header. `kube_auth_layer` is what it would cost to ask kube-rs's
//! `AuthLayer` on every request instead (a token file, whose copy kube-rs caches for about a
//! minute: the cheapest refreshable case; an exec token adds one mutex every request
//! contends on). Both run on a current-thread runtime, `PER_BLOCK` calls per `block_on`.

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{hint::black_box, time::Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use gateway_userspace::proxy::UpstreamCredential;
use http::HeaderMap;

const PER_BLOCK: u64 = 1_000;

fn credential(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.bench-token-0123456789abcdef").expect("token");
    let mut config = kube::Config::new("https://127.0.0.1:6443".parse().expect("uri"));
    config.auth_info.token_file = Some(token.to_str().expect("UTF-8").to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let credential = rt
        .block_on(UpstreamCredential::from_kube(&config, "bench token file"))
        .expect("credential");
    let mut group = c.benchmark_group("credential");
    group.bench_function("cached", |b| {
        let mut headers = HeaderMap::new();
        b.iter(|| {
            credential.apply(&mut headers).expect("credential");
            black_box(&headers);
        });
    });
    group.bench_function("kube_auth_layer", |b| {
        b.iter_custom(|iters| {
            let credential = credential.clone();
            rt.block_on(async move {
                let mut headers = HeaderMap::new();
                let start = Instant::now();
                let mut left = iters;
                while left > 0 {
                    for _ in 0..left.min(PER_BLOCK) {
                        credential
                            .apply_through_kube(&mut headers)
                            .await
                            .expect("credential");
                        black_box(&headers);
                    }
                    left = left.saturating_sub(PER_BLOCK);
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group!(benches, credential);
criterion_main!(benches);
