//! Identity at node scale (issue 14, item 5): what the pod store and the cgroup resolver
//! cost with 100, 1,000 and 10,000 pods on a node (a real node runs at most a few hundred;
//! 10,000 is the stress case).
//!
//! * `identity/resync/N`: replacing the store's index with N pods (what a relist does);
//! * `identity/resolve_path/N`: a connection's workload from its cgroup path (kubelet's
//!   systemd layout), the pod found by UID among N;
//! * `identity/rescan/N`: the resolver walking a cgroup tree of N pods (one container
//!   each; a plain directory tree, whose inode numbers stand in for cgroup ids as they do
//!   on cgroup2), what an unknown cgroup id costs at most once per rescan interval;
//! * `identity/resolve_cgroup/N`: a known cgroup id to its workload (cache hit), the
//!   per-connection cost;
//! * `identity/new_cgroup_by_id`: a cgroup the cache does not know (a new pod) on the host's
//!   cgroup2 mount, opened by its id instead of a rescan (root only);
//! * `identity/verify_token/{cache,connection}`: a request's bearer token (a ServiceAccount
//!   token is about a kilobyte) to its principal once verified, from the shared token cache
//!   (SHA-256 of the token, a locked map) and from the connection's memo of its last token.
//!
//! The store's memory at each size is printed (resident set growth of this process).
//!
//! `cargo bench -p gateway-userspace --bench identity`

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{hint::black_box, os::unix::fs::MetadataExt as _, path::Path, sync::Arc, time::Duration};

use chaperone_testkit::tokenreview::FakeTokenReviewer;
use gateway_userspace::identity::{
    TokenReviewer, WorkloadIdentity,
    principal::{PrincipalVerifier, TokenMemo},
};
use http::HeaderValue;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gateway_userspace::identity::{
    Identity, IdentityConfig,
    pods::PodStore,
    resolver::{CgroupResolver, ResolverLimits},
};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodSpec, PodStatus};
use kube::api::ObjectMeta;

fn uid(i: usize) -> String {
    format!("0b6d3c1e-8f2a-4c5b-9d7e-{i:012x}")
}

fn container_id(i: usize) -> String {
    format!("{:064x}", i * 7919 + 1)
}

fn pod(i: usize) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(format!("team-{}", i % 50)),
            name: Some(format!("agent-{i}")),
            uid: Some(uid(i)),
            labels: Some(
                [
                    ("app".to_owned(), "agent".to_owned()),
                    ("pod-template-hash".to_owned(), "7d9f8b6c5".to_owned()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some("agent".to_owned()),
            node_name: Some("node-a".to_owned()),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "agent".to_owned(),
                container_id: Some(format!("containerd://{}", container_id(i))),
                ready: true,
                image: "agent:1".to_owned(),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// kubelet's systemd cgroup path of pod `i`'s container.
fn cgroup_path(i: usize) -> String {
    format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        uid(i).replace('-', "_"),
        container_id(i)
    )
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

fn identity(pods: &[Pod], resolver: Option<CgroupResolver>) -> Identity {
    let store = PodStore::new();
    store.resync(pods);
    let config: IdentityConfig = serde_norway::from_str("{}").expect("identity config");
    Identity::new(&config, "node-a", resolver, store).expect("identity")
}

/// A directory tree shaped like kubelet's cgroups for `n` pods; the cgroup id (inode) of
/// each pod's container directory.
fn tree(root: &Path, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let dir = root.join(cgroup_path(i));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::metadata(&dir).expect("stat").ino()
        })
        .collect()
}

fn bench_identity(c: &mut Criterion) {
    let mut group = c.benchmark_group("identity");
    group.sample_size(10);
    for n in [100, 1_000, 10_000] {
        let pods: Vec<Pod> = (0..n).map(pod).collect();
        let before = rss_kib();
        let id = identity(&pods, None);
        println!(
            "identity: {n} pods in the store: +{} KiB resident ({} pods held)",
            rss_kib().saturating_sub(before),
            id.pods().len()
        );
        group.bench_function(BenchmarkId::new("resync", n), |b| {
            let store = PodStore::new();
            b.iter(|| store.resync(black_box(&pods)));
        });
        let path = cgroup_path(n / 2);
        let found = id.resolve_path(&path);
        assert_eq!(
            found.pod.as_deref(),
            Some(format!("agent-{}", n / 2).as_str())
        );
        assert_eq!(found.container.as_deref(), Some("agent"));
        group.bench_function(BenchmarkId::new("resolve_path", n), |b| {
            b.iter(|| black_box(id.resolve_path(black_box(&path))));
        });

        let dir = tempfile::tempdir().expect("tempdir");
        let ids = tree(dir.path(), n);
        let resolver = CgroupResolver::new(dir.path().to_owned(), ResolverLimits::default());
        group.bench_function(BenchmarkId::new("rescan", n), |b| {
            b.iter(|| black_box(resolver.rescan().expect("rescan")));
        });
        let with_cgroups = identity(&pods, Some(resolver));
        let cgroup_id = ids[n / 2];
        let found = with_cgroups.resolve_cgroup(cgroup_id);
        assert_eq!(
            found.pod.as_deref(),
            Some(format!("agent-{}", n / 2).as_str())
        );
        group.bench_function(BenchmarkId::new("resolve_cgroup", n), |b| {
            b.iter(|| black_box(with_cgroups.resolve_cgroup(black_box(cgroup_id))));
        });
    }
    group.finish();
}

/// A new cgroup's first lookup on the host's cgroup2 mount: opened by its id, whatever
/// the size of the tree (needs root to create the cgroup; skipped with a reason otherwise).
fn bench_new_cgroup_by_id(c: &mut Criterion) {
    let Ok(host) = CgroupResolver::for_host(ResolverLimits::default()) else {
        println!("identity/new_cgroup_by_id: skipped, no cgroup2 mount");
        return;
    };
    let root = host.root().to_owned();
    let dir = root.join(format!("chaperone-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&dir) {
        println!("identity/new_cgroup_by_id: skipped, cannot create a cgroup: {e}");
        return;
    }
    let id = std::fs::metadata(&dir).expect("stat").ino();
    c.bench_function("identity/new_cgroup_by_id", |b| {
        b.iter(|| {
            // A fresh resolver: an empty cache, as for a pod's first connection.
            let resolver = CgroupResolver::new(root.clone(), ResolverLimits::default());
            let path = resolver.resolve(black_box(id));
            assert!(path.is_some() && resolver.stats().scans == 0);
            path
        });
    });
    let _ = std::fs::remove_dir(&dir);
}

fn bench_verify_token(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let token = format!("sa.{}", "x".repeat(1000));
    let reviewer = Arc::new(FakeTokenReviewer::new());
    reviewer.authenticate(
        &token,
        "system:serviceaccount:agents:agent",
        &[
            "system:serviceaccounts",
            "system:serviceaccounts:agents",
            "system:authenticated",
        ],
    );
    let verifier = PrincipalVerifier::new(
        Vec::new(),
        Some(reviewer as Arc<dyn TokenReviewer>),
        Duration::from_secs(600),
    );
    let header =
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap_or_else(|e| panic!("header: {e}"));
    let workload = WorkloadIdentity::default();
    let memo = TokenMemo::default();
    let first = runtime.block_on(verifier.verify_on_connection(Some(&header), &workload, &memo));
    assert!(first.subject.is_some(), "not verified: {first:?}");
    let mut group = c.benchmark_group("identity/verify_token");
    group.bench_function("cache", |b| {
        b.iter(|| runtime.block_on(verifier.verify(Some(black_box(&header)), &workload)));
    });
    group.bench_function("connection", |b| {
        b.iter(|| {
            runtime.block_on(verifier.verify_on_connection(
                Some(black_box(&header)),
                &workload,
                &memo,
            ))
        });
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_identity,
    bench_new_cgroup_by_id,
    bench_verify_token
);
criterion_main!(benches);
