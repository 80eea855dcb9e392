//! Masking throughput (design target: >= 200 MB/s per core for list and watch masking):
//! parsing, masking and re-serializing a 10 MiB Secret list and a 10 MiB ConfigMap list
//! (the ConfigMaps have no Secret data, so this is the cost of the walk itself: env
//! names, paths and detectors over every string), and a watch stream of the same Secrets
//! fed in 16 KiB chunks.

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
