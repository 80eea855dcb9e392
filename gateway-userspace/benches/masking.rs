//! Masking throughput (design target: >= 200 MB/s per core for list and watch masking):
//! parsing, masking and re-serializing a 10 MiB Secret list and a 10 MiB ConfigMap list
//! (the ConfigMaps have no Secret data, so this is the cost of the walk itself: env
//! names, paths and detectors over every string), a 10 MiB Pod list (env values by name,
//! detectors over the many short strings of a pod), and a watch stream of the same
//! Secrets fed in 16 KiB chunks.

/// The product's allocator (gateway-userspace/src/main.rs): figures with glibc's malloc
/// would not be the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gateway_userspace::masking::objects::{
    MaskLimits, MaskReport, Masker, MaskingSpec, RuleMasking, Target, WatchMasker,
};
use serde_json::{Value, json};

const TEN_MIB: usize = 10 * 1024 * 1024;

fn list(kind: &str, item: impl Fn(usize) -> Value) -> (Vec<u8>, Vec<Value>) {
    let mut items = Vec::new();
    let mut size = 0;
    while size < TEN_MIB {
        let v = item(items.len());
        size += v.to_string().len();
        items.push(v);
    }
    let body = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items});
    (serde_json::to_vec(&body).unwrap_or_default(), items)
}

fn secret(i: usize) -> Value {
    json!({"metadata": {"name": format!("secret-{i}"), "namespace": "prod", "uid": format!("uid-{i}"),
                        "resourceVersion": "1", "labels": {"app": "db", "tier": "backend"}},
           "type": "Opaque",
           "data": {"password": "aHVudGVyMmh1bnRlcjJodW50ZXIyaHVudGVyMg==", "username": "YWRtaW4=",
                    "tls.crt": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t".repeat(40)}})
}

fn configmap(i: usize) -> Value {
    json!({"metadata": {"name": format!("config-{i}"), "namespace": "prod", "uid": format!("uid-{i}"),
                        "resourceVersion": "1", "labels": {"app": "web"}},
           "data": {"mode": "fast", "replicas": "3", "endpoint": "https://api.internal:8443/v1",
                    "feature.flags": "a=true,b=false,c=true", "config.yaml": "key: value\n".repeat(60)}})
}

/// A Deployment's replica as `http_bench`'s list of 500 pods has them: env (one value with
/// a credential in a connection string), probes, owner references, status.
fn pod(i: usize) -> Value {
    json!({"metadata": {"name": format!("api-7d9f8b6c5-{i:05}"), "namespace": "prod",
                        "uid": format!("uid-{i}"), "resourceVersion": "1",
                        "labels": {"app": "api", "pod-template-hash": "7d9f8b6c5", "tier": "backend"},
                        "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T10:00:00Z"},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                            "name": "api-7d9f8b6c5", "uid": "6f1c7e0a-3b52-4a57-9a8e-2f9d0c1b2a3e",
                            "controller": true, "blockOwnerDeletion": true}]},
           "spec": {"serviceAccountName": "api", "nodeName": format!("node-{}", i % 7),
                    "containers": [{"name": "api", "image": "registry.example.com/team/api:1.42.0",
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                        "env": [{"name": "LOG_LEVEL", "value": "info"},
                                {"name": "DATABASE_URL", "value": "postgres://api:hunter2hunter2@db.internal:5432/api"},
                                {"name": "REGION", "value": "eu-west-1"}],
                        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"},
                                      "limits": {"cpu": "1", "memory": "512Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10},
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/api"}]}],
                    "volumes": [{"name": "config", "configMap": {"name": "api-config"}}]},
           "status": {"phase": "Running", "podIP": format!("10.244.{}.{}", i / 250, i % 250 + 2),
                      "conditions": [
                          {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-01T10:00:05Z"},
                          {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-12-01T10:00:05Z"},
                          {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T10:00:00Z"}],
                      "containerStatuses": [{"name": "api", "ready": true, "restartCount": 0,
                          "image": "registry.example.com/team/api:1.42.0",
                          "imageID": "registry.example.com/team/api@sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
                          "containerID": "containerd://9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b",
                          "state": {"running": {"startedAt": "2026-12-01T10:00:03Z"}}}]}})
}

fn masker() -> Arc<Masker> {
    let spec: MaskingSpec = serde_norway::from_str(
        "paths: [{apiGroups: [\"\"], resources: [configmaps], fields: [.data.password]}]",
    )
    .unwrap_or_default();
    let rule = RuleMasking::compile(&spec, &MaskingSpec::default())
        .unwrap_or_else(|e| panic!("bench masking must compile: {e:?}"));
    Arc::new(Masker::combine(
        [(Arc::from("mask"), &rule)],
        MaskLimits::default(),
    ))
}

fn bench_masking(c: &mut Criterion) {
    let m = masker();
    let mut group = c.benchmark_group("masking");
    group.sample_size(10);
    for (name, resource, (body, items)) in [
        ("secret_list_10MiB", "secrets", list("SecretList", secret)),
        (
            "configmap_list_10MiB",
            "configmaps",
            list("ConfigMapList", configmap),
        ),
        ("pod_list_10MiB", "pods", list("PodList", pod)),
    ] {
        let target = Target {
            group: "",
            resource,
        };
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut report = MaskReport::default();
                black_box(m.mask_body(target, black_box(&body), &mut report))
            })
        });
        if resource == "secrets" {
            let events: Vec<u8> = items
                .iter()
                .flat_map(|o| {
                    let mut line = json!({"type": "MODIFIED", "object": o})
                        .to_string()
                        .into_bytes();
                    line.push(b'\n');
                    line
                })
                .collect();
            group.throughput(Throughput::Bytes(events.len() as u64));
            group.bench_function("secret_watch_10MiB_16KiB_chunks", |b| {
                b.iter(|| {
                    let mut w = WatchMasker::new(m.clone(), target);
                    let mut report = MaskReport::default();
                    let mut out = Vec::with_capacity(events.len());
                    for chunk in events.chunks(16 * 1024) {
                        let _ = w.push(chunk, &mut out, &mut report);
                    }
                    let _ = w.finish(&mut out, &mut report);
                    black_box(out)
                })
            });
        }
    }
    group.finish();

    // What masking adds to one `kubectl get secret -o yaml` (the proxy reads the body,
    // masks it, and sends the result): the CPU the gateway spends on the response.
    let one = serde_json::to_vec(&secret(7)).expect("secret json");
    let target = Target {
        group: "",
        resource: "secrets",
    };
    let mut group = c.benchmark_group("masking_single");
    group.throughput(Throughput::Bytes(one.len() as u64));
    group.bench_function("get_secret", |b| {
        b.iter(|| {
            let mut report = MaskReport::default();
            black_box(m.mask_body(target, black_box(&one), &mut report))
        })
    });
    group.finish();
}

criterion_group!(benches, bench_masking);
criterion_main!(benches);
