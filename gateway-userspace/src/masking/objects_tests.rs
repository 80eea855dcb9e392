//! Tests of the object masker: shapes (object, list, Table, watch event), every workload
//! kind's pod template, settings, limits and hostile input.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Value, json};

use super::objects::*;

const SECRETS: Target<'static> = Target {
    group: "",
    resource: "secrets",
};

fn masker_with(spec: MaskingSpec) -> Masker {
    check_spec(&spec, false).unwrap();
    let rule = RuleMasking::compile(&MaskingSpec::default(), &spec).unwrap();
    Masker::combine([(Arc::from("mask-rule"), &rule)], MaskLimits::default())
}

fn masker() -> Masker {
    masker_with(MaskingSpec::default())
}

fn masked(m: &Masker, target: Target<'_>, mut v: Value) -> (Value, MaskReport) {
    let mut report = MaskReport::default();
    m.mask_value(target, &mut v, &mut report);
    (v, report)
}

fn secret(name: &str, value: &str) -> Value {
    json!({"kind": "Secret", "apiVersion": "v1",
           "metadata": {"name": name, "namespace": "d", "labels": {"app": "db"},
                        "annotations": {"team": "storage"}},
           "type": "kubernetes.io/basic-auth",
           "data": {"password": value, "username": "YWRtaW4="}})
}

#[test]
fn placeholder_decodes_as_base64_to_the_placeholder_text() {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(PLACEHOLDER_BASE64)
        .unwrap();
    assert_eq!(decoded, PLACEHOLDER_TEXT.as_bytes());
}

#[test]
fn secret_values_are_replaced_keys_type_and_metadata_kept() {
    let (v, report) = masked(&masker(), SECRETS, secret("db", "aHVudGVyMg=="));
    assert_eq!(
        v["data"],
        json!({"password": PLACEHOLDER_BASE64, "username": PLACEHOLDER_BASE64})
    );
    assert_eq!(v["type"], "kubernetes.io/basic-auth");
    assert_eq!(v["metadata"], secret("db", "")["metadata"]);
    assert_eq!(
        report.counts,
        vec![MaskCount {
            rule: Arc::from("mask-rule"),
            kind: MaskKind::SecretData,
            count: 2
        }]
    );
    assert_eq!(
        report.to_json().unwrap(),
        r#"[{"count":2,"kind":"secretData","rule":"mask-rule"}]"#
    );
    assert!(!v.to_string().contains("aHVudGVyMg=="));
}

#[test]
fn invalid_base64_and_odd_values_in_a_secret_are_masked_too() {
    let mut s = secret("db", "%%% not base64 %%%");
    s["data"]["n"] = json!(5);
    s["data"]["nested"] = json!({"x": "y"});
    s["stringData"] = json!({"plain": "hunter2", "gone": null});
    let (v, report) = masked(&masker(), SECRETS, s);
    assert_eq!(v["data"]["password"], PLACEHOLDER_BASE64);
    assert_eq!(v["data"]["n"], PLACEHOLDER_BASE64);
    assert_eq!(v["data"]["nested"]["x"], PLACEHOLDER_BASE64);
    assert_eq!(
        v["stringData"],
        json!({"plain": PLACEHOLDER_TEXT, "gone": null})
    );
    assert_eq!(report.total(), 5);
    assert!(!v.to_string().contains("hunter2"));
}

#[test]
fn lists_tables_and_watch_events_of_secrets() {
    let m = masker();
    // A list's items carry no kind: the request's resource says they are Secrets.
    let list = json!({"kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
                      "items": [{"metadata": {"name": "a"}, "data": {"k": "c2VjcmV0"}},
                                {"metadata": {"name": "b"}, "data": {"k": "c2VjcmV0"}}]});
    let (v, report) = masked(&m, SECRETS, list);
    assert_eq!(v["items"][0]["data"]["k"], PLACEHOLDER_BASE64);
    assert_eq!(v["items"][1]["data"]["k"], PLACEHOLDER_BASE64);
    assert_eq!(v["metadata"]["resourceVersion"], "7");
    assert_eq!(report.total(), 2);

    let table = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
    "columnDefinitions": [{"name": "Name", "type": "string"}],
    "rows": [
        {"cells": ["a", "Opaque", 1], "object": {"kind": "Secret", "metadata": {"name": "a"}, "data": {"k": "c2VjcmV0"}}},
        {"cells": ["b", "Opaque", 1], "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"name": "b", "annotations": {"kubectl.kubernetes.io/last-applied-configuration":
                "{\"apiVersion\":\"v1\",\"data\":{\"k\":\"c2VjcmV0\"},\"kind\":\"Secret\"}\n"}}}},
        {"cells": ["c", "Opaque", 1]}
    ]});
    let (v, _) = masked(&m, SECRETS, table);
    assert_eq!(v["rows"][0]["object"]["data"]["k"], PLACEHOLDER_BASE64);
    assert_eq!(v["rows"][0]["cells"], json!(["a", "Opaque", 1]));
    let annotation = v["rows"][1]["object"]["metadata"]["annotations"]
        ["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .unwrap();
    let inner: Value = serde_json::from_str(annotation).unwrap();
    assert_eq!(inner["data"]["k"], PLACEHOLDER_BASE64);
    assert!(!v.to_string().contains("c2VjcmV0"));

    let event = json!({"type": "MODIFIED", "object": {"kind": "Secret", "metadata": {"name": "a"}, "data": {"k": "c2VjcmV0"}}});
    let (v, _) = masked(&m, SECRETS, event);
    assert_eq!(v["type"], "MODIFIED");
    assert_eq!(v["object"]["data"]["k"], PLACEHOLDER_BASE64);

    // A Status (watch ERROR, failed request) is left as it is.
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "m", "code": 404,
                        "details": {"name": "x", "kind": "secrets"}});
    let (v, report) = masked(&m, SECRETS, status.clone());
    assert_eq!(v, status);
    assert_eq!(report.total(), 0);
}

#[test]
fn last_applied_of_a_secret_stays_json_and_unparseable_is_replaced() {
    let mut s = secret("db", "aHVudGVyMg==");
    s["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
        json!(secret("db", "aHVudGVyMg==").to_string());
    let (v, report) = masked(&masker(), SECRETS, s);
    let text = v["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .unwrap();
    let inner: Value = serde_json::from_str(text).unwrap();
    assert_eq!(inner["data"]["password"], PLACEHOLDER_BASE64);
    assert_eq!(report.total(), 4);
    assert!(!v.to_string().contains("aHVudGVyMg=="));

    let mut s = secret("db", "x");
    s["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
        json!("{not json hunter2");
    let (v, report) = masked(&masker(), SECRETS, s);
    assert_eq!(
        v["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
        PLACEHOLDER_TEXT
    );
    assert!(
        report
            .counts
            .iter()
            .any(|c| c.kind == MaskKind::LastApplied)
    );
}

fn pod_spec() -> Value {
    json!({
        "containers": [{"name": "app", "image": "i", "env": [
            {"name": "DB_PASSWORD", "value": "hunter2"},
            {"name": "db_password_file", "value": "/etc/hunter2"},
            {"name": "LOG_LEVEL", "value": "debug"},
            {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}},
        ]}],
        "initContainers": [{"name": "init", "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]}],
        "ephemeralContainers": [{"name": "debug", "env": [{"name": "Private_Key", "value": "hunter2"}]}],
    })
}

fn assert_pod_spec_masked(spec: &Value, what: &str) {
    let env = &spec["containers"][0]["env"];
    assert_eq!(env[0]["value"], PLACEHOLDER_TEXT, "{what}: DB_PASSWORD");
    assert_eq!(
        env[1]["value"], PLACEHOLDER_TEXT,
        "{what}: names match case-insensitively"
    );
    assert_eq!(env[2]["value"], "debug", "{what}: LOG_LEVEL stays");
    assert_eq!(
        env[3]["valueFrom"],
        json!({"secretKeyRef": {"name": "s", "key": "t"}}),
        "{what}: references stay"
    );
    assert_eq!(
        spec["initContainers"][0]["env"][0]["value"], PLACEHOLDER_TEXT,
        "{what}: init"
    );
    assert_eq!(
        spec["ephemeralContainers"][0]["env"][0]["value"], PLACEHOLDER_TEXT,
        "{what}: ephemeral"
    );
}

#[test]
fn env_values_are_masked_in_pods_and_every_workload_template() {
    let m = masker();
    let template = json!({"metadata": {"labels": {"app": "x"}}, "spec": pod_spec()});
    let cases = [
        (
            "pods",
            "",
            json!({"kind": "Pod", "spec": pod_spec()}),
            vec!["spec"],
        ),
        (
            "deployments",
            "apps",
            json!({"kind": "Deployment", "spec": {"template": template}}),
            vec!["spec", "template", "spec"],
        ),
        (
            "statefulsets",
            "apps",
            json!({"kind": "StatefulSet", "spec": {"template": template}}),
            vec!["spec", "template", "spec"],
        ),
        (
            "daemonsets",
            "apps",
            json!({"kind": "DaemonSet", "spec": {"template": template}}),
            vec!["spec", "template", "spec"],
        ),
        (
            "replicasets",
            "apps",
            json!({"kind": "ReplicaSet", "spec": {"template": template}}),
            vec!["spec", "template", "spec"],
        ),
        (
            "replicationcontrollers",
            "",
            json!({"kind": "ReplicationController", "spec": {"template": template}}),
            vec!["spec", "template", "spec"],
        ),
        (
            "jobs",
            "batch",
            json!({"kind": "Job", "spec": {"template": template}}),
            vec!["spec", "template", "spec"],
        ),
        (
            "cronjobs",
            "batch",
            json!({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": template}}}}),
            vec!["spec", "jobTemplate", "spec", "template", "spec"],
        ),
        (
            "podtemplates",
            "",
            json!({"kind": "PodTemplate", "template": template}),
            vec!["template", "spec"],
        ),
        (
            // What the StatefulSet and DaemonSet controllers store as a revision: a patch
            // that replaces the template.
            "controllerrevisions",
            "apps",
            json!({"kind": "ControllerRevision", "revision": 1,
                   "data": {"spec": {"template": {"$patch": "replace", "spec": pod_spec()}}}}),
            vec!["data", "spec", "template", "spec"],
        ),
    ];
    for (resource, group, object, path) in cases {
        let target = Target { group, resource };
        let (v, report) = masked(&m, target, object);
        let spec = path.iter().fold(&v, |v, k| &v[*k]);
        assert_pod_spec_masked(spec, resource);
        assert_eq!(report.total(), 4, "{resource}");
        assert!(!v.to_string().contains("hunter2"), "{resource}");
        // In a list (items without kind) too.
        let (v, _) = masked(&m, target, json!({"kind": "List", "items": [v]}));
        assert!(!v.to_string().contains("hunter2"), "{resource} list");
    }
}

#[test]
fn env_names_and_secrets_are_configurable() {
    let spec: MaskingSpec = serde_norway::from_str("secrets: false\nenvNames: [level]\n").unwrap();
    let m = masker_with(spec);
    let (v, _) = masked(&m, SECRETS, secret("db", "aHVudGVyMg=="));
    assert_eq!(v["data"]["password"], "aHVudGVyMg==", "secrets: false");
    let (v, _) = masked(
        &m,
        Target {
            group: "",
            resource: "pods",
        },
        json!({"spec": pod_spec()}),
    );
    let env = &v["spec"]["containers"][0]["env"];
    assert_eq!(env[0]["value"], "hunter2");
    assert_eq!(env[2]["value"], PLACEHOLDER_TEXT);
}

/// A printer column can show a masked field, and a Table does not say which field each
/// column shows: the cells of a resource with configured paths are masked whole.
#[test]
fn table_cells_of_a_resource_with_configured_paths_are_masked() {
    let spec: MaskingSpec = serde_norway::from_str(
        "paths: [{apiGroups: [db.example], resources: [databases], fields: [.spec.password]}]",
    )
    .unwrap();
    let m = masker_with(spec);
    let table = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "columnDefinitions": [{"name": "Name", "type": "string"}, {"name": "Password", "type": "string"}],
        "rows": [{"cells": ["main", "hunter2"],
                  "object": {"kind": "Database", "metadata": {"name": "main"}, "spec": {"password": "hunter2"}}}]});
    let databases = Target {
        group: "db.example",
        resource: "databases",
    };
    assert!(m.paths_apply_to(databases));
    let (v, report) = masked(&m, databases, table.clone());
    assert_eq!(
        v["rows"][0]["cells"],
        json!([PLACEHOLDER_TEXT, PLACEHOLDER_TEXT])
    );
    assert_eq!(v["rows"][0]["object"]["spec"]["password"], PLACEHOLDER_TEXT);
    assert!(!v.to_string().contains("hunter2"));
    assert_eq!(report.total(), 3);
    // Another resource's Table keeps its cells (the detectors still run over them).
    let other = Target {
        group: "db.example",
        resource: "backups",
    };
    assert!(!m.paths_apply_to(other));
    let (v, _) = masked(&m, other, table);
    assert_eq!(v["rows"][0]["cells"], json!(["main", "hunter2"]));
}

#[test]
fn configured_paths_per_group_and_resource() {
    let spec: MaskingSpec = serde_norway::from_str(
        r#"
paths:
  - apiGroups: [""]
    resources: [configmaps]
    fields: [".data.password", '.data["tls.key"]', ".data.nested[*].v"]
  - apiGroups: [example.com]
    resources: ["*"]
    fields: [".spec.credentials.*"]
"#,
    )
    .unwrap();
    let m = masker_with(spec);
    let cm = json!({"kind": "ConfigMap", "data": {"password": "hunter2", "tls.key": "hunter2", "mode": "fast",
                    "nested": [{"v": "hunter2"}, {"v": "hunter2", "w": "keep"}]}});
    let (v, report) = masked(
        &m,
        Target {
            group: "",
            resource: "configmaps",
        },
        cm.clone(),
    );
    assert_eq!(v["data"]["password"], PLACEHOLDER_TEXT);
    assert_eq!(v["data"]["tls.key"], PLACEHOLDER_TEXT);
    assert_eq!(v["data"]["mode"], "fast");
    assert_eq!(v["data"]["nested"][1]["w"], "keep");
    assert!(!v.to_string().contains("hunter2"));
    assert_eq!(report.total(), 4);
    // Another resource is left alone.
    let (v, _) = masked(
        &m,
        Target {
            group: "",
            resource: "services",
        },
        cm.clone(),
    );
    assert_eq!(v, cm);
    let cr = json!({"spec": {"credentials": {"a": "hunter2", "b": {"c": "hunter2"}}, "x": "keep"}});
    let (v, _) = masked(
        &m,
        Target {
            group: "example.com",
            resource: "widgets",
        },
        cr,
    );
    assert!(!v.to_string().contains("hunter2"));
    assert_eq!(v["spec"]["x"], "keep");
}

#[test]
fn bad_settings_name_the_field() {
    for (yaml, path, needle) in [
        (
            "paths: [{resources: [configmaps], fields: [data.x]}]",
            vec![
                SpecPathPart::Key("paths"),
                SpecPathPart::Index(0),
                SpecPathPart::Key("fields"),
                SpecPathPart::Index(0),
            ],
            "must start with '.'",
        ),
        (
            "paths: [{resources: [configmaps], fields: ['.data[x']}]",
            vec![
                SpecPathPart::Key("paths"),
                SpecPathPart::Index(0),
                SpecPathPart::Key("fields"),
                SpecPathPart::Index(0),
            ],
            "without ']'",
        ),
        (
            "paths: [{resources: [configmaps], fields: []}]",
            vec![
                SpecPathPart::Key("paths"),
                SpecPathPart::Index(0),
                SpecPathPart::Key("fields"),
            ],
            "at least one field",
        ),
        (
            "paths: [{resources: [ConfigMaps], fields: [.a]}]",
            vec![
                SpecPathPart::Key("paths"),
                SpecPathPart::Index(0),
                SpecPathPart::Key("resources"),
                SpecPathPart::Index(0),
            ],
            "malformed resource",
        ),
        (
            "paths: [{apiGroups: [], resources: [a], fields: [.a]}]",
            vec![
                SpecPathPart::Key("paths"),
                SpecPathPart::Index(0),
                SpecPathPart::Key("apiGroups"),
            ],
            "lists no API group",
        ),
        (
            "envNames: [' ']",
            vec![SpecPathPart::Key("envNames"), SpecPathPart::Index(0)],
            "must not be empty",
        ),
        (
            "maxResponseBytes: 100",
            vec![SpecPathPart::Key("maxResponseBytes")],
            "top-level",
        ),
    ] {
        let spec: MaskingSpec = serde_norway::from_str(yaml).unwrap();
        let err = check_spec(&spec, false).unwrap_err();
        assert_eq!(err.path, path, "{yaml}");
        assert!(err.message.contains(needle), "{yaml}: {}", err.message);
    }
    let spec: MaskingSpec = serde_norway::from_str("maxResponseBytes: 100").unwrap();
    let err = compile_limits(&spec).unwrap_err();
    assert!(err.message.contains("too small"), "{}", err.message);
    // A masked answer is held whole: no bound past 1 GiB (u64::MAX once wrapped to 0).
    for huge in [
        "maxResponseBytes: 18446744073709551615",
        "maxWatchEventBytes: 1073741825",
    ] {
        let spec: MaskingSpec = serde_norway::from_str(huge).unwrap();
        let err = compile_limits(&spec).unwrap_err();
        assert!(
            err.message.contains("at most 1073741824"),
            "{huge}: {}",
            err.message
        );
    }
    let spec: MaskingSpec = serde_norway::from_str("maxResponseBytes: 1073741824").unwrap();
    assert_eq!(compile_limits(&spec).unwrap().max_response_bytes, 1 << 30);
}

#[test]
fn combined_rules_count_for_the_first_rule_that_asked() {
    let a = RuleMasking::compile(
        &MaskingSpec::default(),
        &serde_norway::from_str("envNames: []").unwrap(),
    )
    .unwrap();
    let b = RuleMasking::compile(
        &MaskingSpec::default(),
        &serde_norway::from_str("secrets: false\nenvNames: [password]").unwrap(),
    )
    .unwrap();
    let m = Masker::combine(
        [(Arc::from("a"), &a), (Arc::from("b"), &b)],
        MaskLimits::default(),
    );
    assert_eq!(
        m.rules().iter().map(|r| &**r).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let (_, report) = masked(&m, SECRETS, secret("db", "eA=="));
    assert_eq!(&*report.counts[0].rule, "a");
    let (_, report) = masked(
        &m,
        Target {
            group: "",
            resource: "pods",
        },
        json!({"spec": pod_spec()}),
    );
    assert!(
        report
            .counts
            .iter()
            .all(|c| &*c.rule == "b" && c.kind == MaskKind::Env)
    );
}

#[test]
fn watch_events_split_anywhere_are_masked_and_the_stream_is_never_held_whole() {
    let m = Arc::new(masker());
    let events: Vec<u8> = (0..5)
        .flat_map(|i| {
            let mut line =
                json!({"type": "ADDED", "object": secret(&format!("s{i}"), "aHVudGVyMg==")})
                    .to_string()
                    .into_bytes();
            line.push(b'\n');
            line
        })
        .collect();
    for chunk in [1, 2, 7, 64, 1000, events.len()] {
        let mut w = WatchMasker::new(m.clone(), SECRETS);
        let mut out = Vec::new();
        let mut report = MaskReport::default();
        for piece in events.chunks(chunk) {
            w.push(piece, &mut out, &mut report).unwrap();
        }
        w.finish(&mut out, &mut report).unwrap();
        let lines: Vec<Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 5, "chunk {chunk}");
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(line["object"]["metadata"]["name"], format!("s{i}"));
            assert_eq!(line["object"]["data"]["password"], PLACEHOLDER_BASE64);
        }
        assert_eq!(report.total(), 10, "chunk {chunk}");
        assert!(!String::from_utf8_lossy(&out).contains("aHVudGVyMg=="));
    }
    // An event completed by the first chunk is emitted before the next one arrives.
    let mut w = WatchMasker::new(m.clone(), SECRETS);
    let mut out = Vec::new();
    let first_end = events.iter().position(|&b| b == b'\n').unwrap();
    w.push(
        &events[..first_end + 3],
        &mut out,
        &mut MaskReport::default(),
    )
    .unwrap();
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    // A last event without its newline is masked at the end.
    let mut w = WatchMasker::new(m, SECRETS);
    let mut out = Vec::new();
    w.push(&events[..first_end], &mut out, &mut MaskReport::default())
        .unwrap();
    assert!(out.is_empty());
    w.finish(&mut out, &mut MaskReport::default()).unwrap();
    assert!(String::from_utf8_lossy(&out).contains(PLACEHOLDER_BASE64));
}

#[test]
fn a_watch_event_over_the_bound_fails_and_a_broken_event_fails() {
    let spec = MaskingSpec {
        max_watch_event_bytes: Some(4096),
        ..MaskingSpec::default()
    };
    let limits = compile_limits(&spec).unwrap();
    let rule = RuleMasking::compile(&spec, &MaskingSpec::default()).unwrap();
    let m = Arc::new(Masker::combine([(Arc::from("r"), &rule)], limits));
    let mut w = WatchMasker::new(m.clone(), SECRETS);
    let mut out = Vec::new();
    let huge = vec![b'x'; 1000];
    let mut failed = None;
    for i in 0..10 {
        if let Err(e) = w.push(&huge, &mut out, &mut MaskReport::default()) {
            failed = Some((i, e));
            break;
        }
    }
    let (i, e) = failed.expect("an event over the bound must fail");
    assert_eq!(i, 4, "fails as soon as the bound is passed");
    assert!(e.to_string().contains("larger than the 4096 bytes"), "{e}");
    assert!(out.is_empty());

    let mut w = WatchMasker::new(m, SECRETS);
    let err = w
        .push(
            b"{\"type\":\"ADDED\",\"object\":{\"data\":\n",
            &mut out,
            &mut MaskReport::default(),
        )
        .unwrap_err();
    assert!(matches!(err, MaskError::Parse(_)));
    assert!(
        !err.to_string().contains("data"),
        "errors never quote content: {err}"
    );
    let event: Value = serde_json::from_slice(&watch_error_event("m")).unwrap();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 500);
}

#[test]
fn deep_and_huge_bodies_neither_overflow_nor_pass() {
    let m = masker();
    // serde_json's recursion limit (128) refuses a deeper body: it is never passed on.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let err = m
        .mask_body(SECRETS, deep.as_bytes(), &mut MaskReport::default())
        .unwrap_err();
    assert!(matches!(err, MaskError::Parse(_)), "{err}");
    // Nesting under the limit, through objects, masks fine.
    let mut nested = secret("db", "aHVudGVyMg==");
    for _ in 0..120 {
        nested = json!({"a": nested});
    }
    let out = m
        .mask_body(
            SECRETS,
            nested.to_string().as_bytes(),
            &mut MaskReport::default(),
        )
        .unwrap();
    assert!(!String::from_utf8_lossy(&out).contains("hunter2"));
    // Last-applied annotations nested in each other are bounded too.
    let mut obj = secret("db", "aHVudGVyMg==");
    for _ in 0..10 {
        let mut outer = secret("db", "aHVudGVyMg==");
        outer["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
            json!(obj.to_string());
        obj = outer;
    }
    let out = m
        .mask_body(
            SECRETS,
            obj.to_string().as_bytes(),
            &mut MaskReport::default(),
        )
        .unwrap();
    assert!(!String::from_utf8_lossy(&out).contains("aHVudGVyMg=="));
    // Over the response bound.
    let spec = MaskingSpec {
        max_response_bytes: Some(2048),
        ..MaskingSpec::default()
    };
    let rule = RuleMasking::compile(&spec, &MaskingSpec::default()).unwrap();
    let small = Masker::combine([(Arc::from("r"), &rule)], compile_limits(&spec).unwrap());
    let big = json!({"kind": "SecretList", "items": vec![secret("a", "eA=="); 100]}).to_string();
    let err = small
        .mask_body(SECRETS, big.as_bytes(), &mut MaskReport::default())
        .unwrap_err();
    assert!(matches!(err, MaskError::TooLarge { .. }));
    assert!(
        m.mask_body(SECRETS, b"not json", &mut MaskReport::default())
            .is_err()
    );
}

/// An AWS access key id (`AKIA` + 16 base32 characters) in any string value is replaced
/// by the detector's marker, and only the key: the rest of the value stays.
#[test]
fn detectors_run_over_every_other_string_value() {
    let m = masker();
    let key = "AKIAQ3EGRT7NWZ5KXP4M";
    let cm = json!({"kind": "ConfigMap", "data": {"note": format!("key={key} region=eu-west-1")}, "metadata": {"name": "c"}});
    let (v, report) = masked(
        &m,
        Target {
            group: "",
            resource: "configmaps",
        },
        cm,
    );
    assert_eq!(
        v["data"]["note"],
        "key=**masked:aws-access-key** region=eu-west-1"
    );
    assert!(
        report
            .counts
            .iter()
            .any(|c| matches!(c.kind, MaskKind::Detector(_))),
        "{report:?}"
    );
}

/// A list is masked item by item (`mask_body`'s list path): the output and the report are
/// those of masking the whole decoded list, for every shape a list path can meet.
#[test]
fn lists_masked_item_by_item_equal_the_whole_list_masked() {
    let spec: MaskingSpec = serde_norway::from_str(
        "paths: [{apiGroups: [\"\"], resources: [configmaps], fields: [.data.token]}]",
    )
    .unwrap();
    let m = masker_with(spec);
    let pod = |i: usize| {
        json!({"kind": "Pod", "metadata": {"name": format!("p{i}"), "annotations": {
                   super::LAST_APPLIED: json!({"kind": "Pod", "spec": {"containers": [{"name": "c",
                       "env": [{"name": "DB_PASSWORD", "value": "hunter2"}]}]}}).to_string()}},
               "spec": {"containers": [{"name": "c", "image": "x",
                   "env": [{"value": "value-before-name", "name": "API_TOKEN"},
                           {"name": "DATABASE_URL", "value": "postgres://u:pw-123456@db:5432/x"},
                           {"name": "LEVEL", "value": "info"}]}]}})
    };
    let configmaps = Target {
        group: "",
        resource: "configmaps",
    };
    let pods = Target {
        group: "",
        resource: "pods",
    };
    let cases: Vec<(Target<'_>, String)> = vec![
        (
            SECRETS,
            json!({"kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
                   "items": [secret("a", "eA=="), secret("b", "not base64 !"), json!({"data": {"x": 1}})]})
            .to_string(),
        ),
        (
            pods,
            json!({"kind": "PodList", "items": (0..5).map(pod).collect::<Vec<_>>()}).to_string(),
        ),
        (
            configmaps,
            json!({"items": [{"kind": "ConfigMap", "data": {"token": "t", "k": "AKIAQ3EGRT7NWZ5KXP4M",
                                                          "ok": "plain"}},
                             {"kind": "Secret", "data": {"inner": "eA=="}}],
                   "metadata": {"continue": "next-page", "remainingItemCount": 3}})
            .to_string(),
        ),
        // Whitespace, escapes and keys out of order, as a hand-written server may send.
        (
            SECRETS,
            "{ \"metadata\" : { \"resourceVersion\" : \"1\" } ,\n \"items\" : [ {\"data\": {\"p\": \"\\u0065A==\"}, \"kind\": \"Secret\"} ],\n \"kind\" : \"SecretList\" }\n"
                .to_owned(),
        ),
        (SECRETS, json!({"kind": "SecretList", "items": []}).to_string()),
        // Not lists: masked whole, as before.
        (SECRETS, json!({"kind": "Secret", "items": [1], "data": {"a": "eA=="}}).to_string()),
        (SECRETS, json!({"kind": "SecretList", "items": "no array"}).to_string()),
        (SECRETS, json!([secret("a", "eA==")]).to_string()),
    ];
    for (target, body) in cases {
        let mut whole: Value = serde_json::from_str(&body).unwrap();
        let mut want_report = MaskReport::default();
        m.mask_value(target, &mut whole, &mut want_report);
        let mut report = MaskReport::default();
        let out = m.mask_body(target, body.as_bytes(), &mut report).unwrap();
        let got: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(got, whole, "{body}");
        assert_eq!(report, want_report, "{body}");
        // For a compact body with sorted keys, the same bytes too.
        let reencoded = serde_json::from_str::<Value>(&body).unwrap().to_string();
        if reencoded == body {
            assert_eq!(String::from_utf8(out).unwrap(), whole.to_string(), "{body}");
        }
    }
    // Garbage is refused either way, never passed through.
    for bad in [
        &b"{\"items\": [1, "[..],
        b"{\"kind\":\"SecretList\",\"items\":[{]}",
        b"nul",
    ] {
        assert!(
            m.mask_body(SECRETS, bad, &mut MaskReport::default())
                .is_err()
        );
    }
}

/// Field ownership would tell whether a write's guessed value equals the masked one (an
/// equal value leaves the field co-owned, another takes it over), so masked answers carry
/// no `managedFields`: objects, list items (the streaming list path) and watch events.
#[test]
fn masked_answers_carry_no_managed_fields() {
    let m = masker();
    let mut owned = secret("s", "c2VjcmV0");
    owned["metadata"]["managedFields"] = json!([
        {"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:data": {"f:password": {}}}}
    ]);
    let (object, _) = masked(&m, SECRETS, owned.clone());
    assert!(
        object["metadata"].get("managedFields").is_none(),
        "{object}"
    );
    assert_eq!(
        object["metadata"]["labels"]["app"], "db",
        "the rest of metadata stays"
    );
    let list = json!({"kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": "5"},
                      "items": [owned.clone(), owned.clone()]});
    let mut report = MaskReport::default();
    let body = m
        .mask_body(SECRETS, list.to_string().as_bytes(), &mut report)
        .expect("masked list");
    let list: Value = serde_json::from_slice(&body).expect("JSON");
    for item in list["items"].as_array().expect("items") {
        assert!(item["metadata"].get("managedFields").is_none(), "{item}");
    }
    let event = json!({"type": "MODIFIED", "object": owned});
    let (event, _) = masked(&m, SECRETS, event);
    assert!(
        event["object"]["metadata"].get("managedFields").is_none(),
        "{event}"
    );
}

/// A masked request's error keeps only the first line of its messages: the API server
/// prints the specs a refused pod update differs in after it, env values included.
#[test]
fn a_masked_error_keeps_the_first_line_of_its_messages() {
    let m = masker();
    let refusal = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422,
        "reason": "Invalid",
        "message": "Pod \"p\" is invalid: spec: Forbidden: pod updates may not change fields\n  core.PodSpec{Env: {Name: \"DB\", Value: \"hunter2\"}}",
        "details": {"causes": [{"field": "spec", "message": "Forbidden\nValue: hunter2"},
                               {"field": "metadata.name", "message": "one line"}]}});
    let (status, _) = masked(&m, SECRETS, refusal);
    let text = status.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Pod \"p\" is invalid") && m.ends_with(WITHHELD)),
        "{status}"
    );
    assert_eq!(status["details"]["causes"][1]["message"], "one line");
}

/// A masked dry-run write's answer loses `metadata.generation` and nothing else.
#[test]
fn a_dry_run_answer_loses_its_generation_only() {
    let answer = br#"{"kind":"Deployment","metadata":{"name":"web","generation":2,"labels":{"a":"b"}},"spec":{"replicas":1.50}}"#;
    let out = without_generation(answer).expect("an object");
    let out: Value = serde_json::from_slice(&out).expect("JSON");
    assert!(out["metadata"].get("generation").is_none(), "{out}");
    assert_eq!(out["metadata"]["labels"]["a"], "b");
    assert_eq!(out["spec"]["replicas"], 1.5);
    assert_eq!(without_generation(b"[1]"), None);
    assert_eq!(without_generation(b"not json"), None);
}
