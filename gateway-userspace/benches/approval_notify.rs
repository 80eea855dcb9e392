//! What a held request pays for approval bookkeeping outside the API server round trips:
//! queueing its notification (the holder calls `Notifier::created` on the request path; it
//! must never wait), and sealing and verifying a decision (the approvals API seals once per
//! decision; every gateway verifies each decided AccessRequest its watch delivers).

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use gateway_userspace::approval::{
    api::{Approver, Decision, DecisionRequest, decide},
    notify::{Notifier, NotifyConfig, WebhookConfig},
    resource::{AccessRequest, AccessRequestSpec, Approvers, Grant, RequestedAction},
    seal::SealKey,
};
use gateway_userspace::identity::PrincipalKind;

fn request() -> AccessRequest {
    let mut r = AccessRequest::new(
        "ar-bench",
        AccessRequestSpec {
            requester: Default::default(),
            request: RequestedAction {
                verb: "patch".into(),
                resource: "apps/deployments".into(),
                subresource: Some("scale".into()),
                namespace: Some("prod".into()),
                name: Some("web".into()),
                path: "/apis/apps/v1/namespaces/prod/deployments/web/scale".into(),
                summary: "scale prod/web to 0 replicas".into(),
            },
            fingerprint: "f".repeat(64),
            rule: "scale-prod".into(),
            approvers: Approvers {
                groups: vec!["sre".into()],
                users: Vec::new(),
            },
            grant: Grant {
                duration: Some("15m".into()),
                ..Default::default()
            },
            node: "node-a".into(),
            created_at: "2026-12-03T20:00:00Z".into(),
            expires_at: "2099-12-03T20:05:00Z".into(),
        },
    );
    r.metadata.namespace = Some("chaperone-system".into());
    r.metadata.uid = Some("3f0c1c1e-0d6b-4a51-9a59-0f7c1b2d3e4f".into());
    r
}

fn approval(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "bench").expect("secret");
    // A receiver that never answers: deliveries wait for their timeout; the queue fills
    // and enqueueing must stay as cheap.
    let config = NotifyConfig {
        webhooks: vec![WebhookConfig {
            url: "http://127.0.0.1:9/hook".parse().expect("url"),
            secret_file: secret,
            ca_file: None,
        }],
        ..Default::default()
    };
    let (_trigger, watch) = gateway_userspace::drain::channel();
    let notifier = rt
        .block_on(async { Notifier::start(&config, watch) })
        .expect("notifier")
        .expect("a target");
    let r = request();
    let key = SealKey::new(vec![7; 32]).expect("key");
    let alice = Approver {
        username: "alice".into(),
        groups: vec!["sre".into()],
        uid: None,
        kind: PrincipalKind::User,
    };
    let now: jiff::Timestamp = "2026-12-03T20:01:00Z".parse().expect("time");
    let status = decide(
        &r,
        &alice,
        Decision::Approve,
        &DecisionRequest::default(),
        now,
        &key,
    )
    .expect("decide");

    let mut group = c.benchmark_group("approval");
    group.bench_function("notify_enqueue", |b| {
        let _guard = rt.enter();
        b.iter(|| notifier.created(black_box(&r)));
    });
    group.bench_function("decide_and_seal", |b| {
        b.iter(|| {
            decide(
                black_box(&r),
                &alice,
                Decision::Approve,
                &DecisionRequest::default(),
                now,
                &key,
            )
            .expect("decide")
        });
    });
    group.bench_function("verify_seal", |b| {
        b.iter(|| {
            key.verify(black_box(&r), black_box(&status))
                .expect("verify")
        });
    });
    group.finish();
}

criterion_group!(benches, approval);
criterion_main!(benches);
