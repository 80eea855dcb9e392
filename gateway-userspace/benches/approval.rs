//! Time from a sealed decision to the held request's release, on the watch path: a request
//! is held by the approval holder (its AccessRequest created in the API test server), the
//! decision is written to the status subresource as the approvals API writes it, and the
//! clock runs from sending that write to `hold()` returning `Approved` (what then forwards
//! the request): the write's round trip, the watch event's delivery, seal verification and
//! the wake-up. The API test server runs in-process over TLS.
//!
//! Besides criterion's estimate it prints p50/p99 over every sample it took (goal: under
//! 100 ms p99).

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chaperone_testkit::apiserver::{ApiServerConfig, TestApiServer};
use criterion::{Criterion, criterion_group, criterion_main};
use gateway_userspace::{
    approval::{
        holder::{HoldOutcome, HoldRequest, Holder, HolderConfig},
        resource::{
            AccessRequest, AccessRequestStatus, Approvers, Phase, RequestedAction, WorkloadRef,
            crd_yaml,
        },
        seal::SealKey,
    },
    policy::{Approval, ApprovalMode, GrantSpec},
    upstream::{Settings, Upstream},
};
use kube::{Api, api::PostParams};

const TOKEN: &str = "bench-token";
const NS: &str = "chaperone-system";

struct Env {
    _apiserver: TestApiServer,
    _dir: tempfile::TempDir,
    api: Api<AccessRequest>,
    holder: Arc<Holder>,
    key: SealKey,
}

async fn env() -> Env {
    let apiserver = TestApiServer::start(ApiServerConfig::with_tokens([TOKEN]))
        .await
        .expect("API test server");
    let crd: serde_json::Value = serde_norway::from_str(&crd_yaml().expect("crd")).expect("yaml");
    apiserver.seed(crd).expect("CRD");
    apiserver
        .seed(
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        )
        .expect("namespace");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.crt"), apiserver.ca_pem()).expect("ca");
    std::fs::write(dir.path().join("token"), TOKEN).expect("token");
    let url: url::Url = apiserver.url().parse().expect("url");
    let upstream = Upstream::from_settings(Settings {
        url: &url,
        ca_file: &dir.path().join("ca.crt"),
        token_file: Some(&dir.path().join("token")),
        client_certificate: None,
        tls_server_name: None,
    })
    .expect("upstream");
    let client = kube::Client::try_from(upstream.config).expect("client");
    let key = SealKey::new(vec![9; 32]).expect("key");
    let holder = Holder::new(
        client.clone(),
        HolderConfig {
            namespace: NS.into(),
            node: "bench".into(),
            seal_key: key.clone(),
            max_pending_per_workload: 1_000_000,
            max_waiting_per_workload: 1_000_000,
            decision_poll: gateway_userspace::approval::holder::DEFAULT_DECISION_POLL,
            used: None,
        },
    );
    tokio::spawn(holder.clone().run_watcher());
    Env {
        _apiserver: apiserver,
        _dir: dir,
        api: Api::namespaced(client, NS),
        holder,
        key,
    }
}

/// Holds one request, approves it once its AccessRequest exists, and returns the time
/// from the decision's write to the release.
async fn one(env: &Env, i: u64) -> Duration {
    let approval = Approval {
        approvers: Approvers {
            groups: vec!["sre".into()],
            users: vec![],
        },
        timeout: Duration::from_secs(60),
        grant: GrantSpec::Once,
        mode: ApprovalMode::Hold,
    };
    let body = format!("{{\"spec\":{{\"replicas\":{i}}}}}");
    let holder = env.holder.clone();
    let held = tokio::spawn(async move {
        let request = HoldRequest {
            rule: "bench",
            approval: &approval,
            workload: WorkloadRef {
                namespace: "agents".into(),
                pod: "agent-0".into(),
                service_account: None,
                uid: None,
            },
            principal: None,
            method: "PATCH",
            target: "/apis/apps/v1/namespaces/prod/deployments/web",
            action: RequestedAction {
                verb: "patch".into(),
                resource: "apps/deployments".into(),
                path: "/apis/apps/v1/namespaces/prod/deployments/web".into(),
                summary: "bench".into(),
                ..Default::default()
            },
            content_type: "application/merge-patch+json",
            body: body.as_bytes(),
        };
        let outcome = holder.hold(&request).await;
        (Instant::now(), outcome)
    });
    let ar = loop {
        let list = env.api.list(&Default::default()).await.expect("list");
        if let Some(ar) = list.items.into_iter().find(|a| a.status.is_none()) {
            break ar;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let name = ar.metadata.name.clone().expect("name");
    let mut status = AccessRequestStatus {
        phase: Phase::Approved,
        decided_by: Some("alice".into()),
        decided_at: Some(jiff::Timestamp::now().to_string()),
        ..Default::default()
    };
    status.seal = Some(env.key.seal(&ar, &status).expect("seal"));
    let mut decided = ar;
    decided.status = Some(status);
    // The watch event can overtake the write's own response, so the clock starts when
    // the write is sent.
    let written = Instant::now();
    env.api
        .replace_status(&name, &PostParams::default(), &decided)
        .await
        .expect("write the decision");
    let (released, outcome) = held.await.expect("hold task");
    assert!(
        matches!(outcome, HoldOutcome::Approved { .. }),
        "{outcome:?}"
    );
    released.saturating_duration_since(written)
}

fn bench_release(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let env = rt.block_on(env());
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut group = c.benchmark_group("approval");
    group.sample_size(20);
    let mut i = 0u64;
    group.bench_function("decision_to_release", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                i += 1;
                let d = rt.block_on(one(&env, i));
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(d);
                total += d;
            }
            total
        })
    });
    group.finish();
    let mut all = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    all.sort();
    if !all.is_empty() {
        let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
        println!(
            "approval/decision_to_release over {} releases: p50 {:?}, p99 {:?}, max {:?}",
            all.len(),
            at(0.5),
            at(0.99),
            all[all.len() - 1]
        );
    }
}

criterion_group!(benches, bench_release);
criterion_main!(benches);
