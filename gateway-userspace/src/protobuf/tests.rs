use serde_json::json;

use super::*;
use chaperone_testkit::protobuf::{Msg, envelope, put_varint};

/// ObjectMeta as client-go writes it: every non-pointer field, even when empty.
fn meta(name: &str, namespace: &str) -> Msg {
    Msg::default()
        .str(1, name)
        .str(2, "")
        .str(3, namespace)
        .str(5, "")
        .str(6, "")
        .varint(7, 0)
        .msg(8, Msg::default())
}

#[test]
fn schema_loads_and_knows_the_kinds_kubectl_sends() {
    let schema = schema().unwrap_or_else(|e| panic!("{e}"));
    for (api_version, kind) in [
        ("v1", "ConfigMap"),
        ("v1", "Secret"),
        ("v1", "Namespace"),
        ("v1", "Service"),
        ("v1", "ServiceAccount"),
        ("v1", "ResourceQuota"),
        ("v1", "DeleteOptions"),
        ("apps/v1", "Deployment"),
        ("apps/v1", "DeleteOptions"),
        ("batch/v1", "Job"),
        ("batch/v1", "CronJob"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
        ("networking.k8s.io/v1", "Ingress"),
        ("policy/v1", "PodDisruptionBudget"),
        ("policy/v1", "Eviction"),
        ("scheduling.k8s.io/v1", "PriorityClass"),
        ("authentication.k8s.io/v1", "TokenRequest"),
        ("authentication.k8s.io/v1", "SelfSubjectReview"),
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview"),
        ("authorization.k8s.io/v1", "SelfSubjectRulesReview"),
        ("autoscaling/v1", "Scale"),
    ] {
        assert!(
            schema.kind(api_version, kind).is_some(),
            "{api_version} {kind} is not in the schema"
        );
    }
    assert!(schema.kind("example.com/v1", "Widget").is_none());
}

#[test]
fn configmap_as_kubectl_create_sends_it() {
    let raw = Msg::default()
        .msg(1, meta("settings", "agents"))
        .str_entry(2, "mode", "fast")
        .str_entry(2, "empty", "")
        .msg(3, Msg::default().str(1, "blob").bytes(2, &[0, 1, 2, 255]))
        .varint(4, 1);
    let t = transcode(&envelope("v1", "ConfigMap", raw)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.object,
        json!({
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": "settings", "generateName": "", "namespace": "agents", "uid": "",
                "resourceVersion": "", "generation": 0, "creationTimestamp": null
            },
            "data": {"mode": "fast", "empty": ""},
            "binaryData": {"blob": "AAEC/w=="},
            "immutable": true
        })
    );
    assert_eq!(
        (t.api_version.as_str(), t.kind.as_str()),
        ("v1", "ConfigMap")
    );
}

#[test]
fn deployment_with_special_types() {
    // metadata.creationTimestamp (Time), spec.strategy.rollingUpdate.maxSurge (IntOrString,
    // int) and maxUnavailable (string), container resources (Quantity map), env from a
    // ConfigMap (inline LocalObjectReference), labels.
    let container = Msg::default()
        .str(1, "app")
        .str(2, "nginx:1.27")
        .str(3, "sleep")
        .str(3, "infinity")
        .msg(
            8,
            Msg::default()
                .entry(1, "cpu", Msg::default().str(1, "250m"))
                .entry(2, "memory", Msg::default().str(1, "64Mi")),
        )
        .msg(
            19,
            Msg::default().msg(
                2,
                Msg::default()
                    .msg(1, Msg::default().str(1, "settings"))
                    .varint(2, 1),
            ),
        );
    let pod_spec = Msg::default().msg(2, container);
    let template = Msg::default()
        .msg(1, Msg::default().str_entry(11, "app", "web"))
        .msg(2, pod_spec);
    let strategy = Msg::default().str(1, "RollingUpdate").msg(
        2,
        Msg::default()
            .msg(1, Msg::default().varint(1, 1).str(3, "25%"))
            .msg(2, Msg::default().varint(1, 0).varint(2, 2)),
    );
    let spec = Msg::default()
        .varint(1, 3)
        .msg(2, Msg::default().str_entry(1, "app", "web"))
        .msg(3, template)
        .msg(4, strategy);
    let metadata = Msg::default()
        .str(1, "web")
        .str(3, "agents")
        .msg(8, Msg::default().varint(1, 1_700_000_000).varint(2, 0))
        .str_entry(11, "app", "web");
    let raw = Msg::default().msg(1, metadata).msg(2, spec);
    let t = transcode(&envelope("apps/v1", "Deployment", raw)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.object,
        json!({
            "kind": "Deployment",
            "apiVersion": "apps/v1",
            "metadata": {
                "name": "web", "namespace": "agents",
                "creationTimestamp": "2023-11-14T22:13:20Z",
                "labels": {"app": "web"}
            },
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{
                        "name": "app",
                        "image": "nginx:1.27",
                        "command": ["sleep", "infinity"],
                        "resources": {"limits": {"cpu": "250m"}, "requests": {"memory": "64Mi"}},
                        "envFrom": [{"configMapRef": {"name": "settings", "optional": true}}]
                    }]}
                },
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": 2}
                }
            }
        })
    );
}

#[test]
fn access_review_and_delete_options() {
    // `kubectl auth can-i delete pods -n agents`.
    let attrs = Msg::default()
        .str(1, "agents")
        .str(2, "delete")
        .str(5, "pods");
    let raw = Msg::default()
        .msg(1, meta("", ""))
        .msg(2, Msg::default().msg(1, attrs));
    let t = transcode(&envelope(
        "authorization.k8s.io/v1",
        "SelfSubjectAccessReview",
        raw,
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.object["spec"],
        json!({"resourceAttributes": {"namespace": "agents", "verb": "delete", "resource": "pods"}})
    );

    // DeleteOptions are sent under the resource's own group version.
    let raw = Msg::default()
        .varint(1, 30)
        .msg(2, Msg::default().str(1, "uid-1"))
        .str(4, "Foreground")
        .str(5, "All");
    let t = transcode(&envelope("apps/v1", "DeleteOptions", raw)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.object,
        json!({
            "kind": "DeleteOptions", "apiVersion": "apps/v1",
            "gracePeriodSeconds": 30, "preconditions": {"uid": "uid-1"},
            "propagationPolicy": "Foreground", "dryRun": ["All"]
        })
    );
}

#[test]
fn user_info_extra_is_a_bare_array_and_times_have_microseconds() {
    // TokenReview status.user.extra: map<string, ExtraValue{items}>.
    let user = Msg::default()
        .str(1, "alice")
        .str(3, "system:authenticated")
        .entry(4, "scopes", Msg::default().str(1, "a").str(1, "b"));
    let raw = Msg::default()
        .msg(1, Msg::default().str(1, "r"))
        .msg(3, Msg::default().varint(1, 1).msg(2, user));
    let t = transcode(&envelope("authentication.k8s.io/v1", "TokenReview", raw))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.object["status"],
        json!({"authenticated": true, "user": {
            "username": "alice", "groups": ["system:authenticated"], "extra": {"scopes": ["a", "b"]}
        }})
    );

    // events.k8s.io Event.eventTime is a MicroTime.
    let raw = Msg::default().msg(1, Msg::default().str(1, "e")).msg(
        2,
        Msg::default()
            .varint(1, 1_700_000_000)
            .varint(2, 123_456_000),
    );
    let t =
        transcode(&envelope("events.k8s.io/v1", "Event", raw)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.object["eventTime"], json!("2023-11-14T22:13:20.123456Z"));
}

#[test]
fn raw_extension_carries_json_or_an_enveloped_object() {
    // ControllerRevision.data is a RawExtension.
    let embedded = envelope(
        "v1",
        "ConfigMap",
        Msg::default().msg(1, Msg::default().str(1, "cm")),
    );
    for (raw, want) in [
        (br#"{"spec":{"x":1}}"#.to_vec(), json!({"spec": {"x": 1}})),
        (
            embedded,
            json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "cm"}}),
        ),
    ] {
        let body = Msg::default()
            .msg(1, Msg::default().str(1, "rev"))
            .msg(2, Msg::default().bytes(1, &raw))
            .varint(3, 2);
        let t = transcode(&envelope("apps/v1", "ControllerRevision", body))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.object["data"], want);
        assert_eq!(t.object["revision"], json!(2));
    }
}

#[test]
fn negative_int32_and_packed_repeated_scalars() {
    // Service port with a negative (invalid, but representable) nodePort, and
    // a packed repeated int64 (PodSecurityContext.supplementalGroups, field 4).
    let port = Msg::default()
        .str(1, "http")
        .varint(3, 80)
        .varint(5, (-1i64) as u64);
    let spec = Msg::default().msg(1, port);
    let t = transcode(&envelope("v1", "Service", Msg::default().msg(2, spec)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.object["spec"]["ports"],
        json!([{"name": "http", "port": 80, "nodePort": -1}])
    );

    let mut packed = Vec::new();
    for g in [1000u64, 2000, 3000] {
        put_varint(&mut packed, g);
    }
    let pod_spec = Msg::default().msg(14, Msg::default().bytes(4, &packed).varint(4, 4000));
    let t = transcode(&envelope("v1", "Pod", Msg::default().msg(2, pod_spec)))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.object["spec"]["securityContext"]["supplementalGroups"],
        json!([1000, 2000, 3000, 4000])
    );
}

#[test]
fn refuses_what_it_cannot_transcode_faithfully() {
    let ok = envelope("v1", "ConfigMap", Msg::default().msg(1, meta("a", "b")));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "json body",
            br#"{"kind":"ConfigMap"}"#.to_vec(),
            "does not start with",
        ),
        ("empty", Vec::new(), "does not start with"),
        ("magic only", MAGIC.to_vec(), "names no kind"),
        (
            "custom resource",
            envelope("example.com/v1", "Widget", Msg::default()),
            "\"Widget\" of apiVersion \"example.com/v1\" is not a built-in",
        ),
        (
            "unknown field",
            envelope("v1", "ConfigMap", Msg::default().str(99, "future")),
            "api.core.v1.ConfigMap: field number 99 is not in the gateway's schema",
        ),
        (
            "unknown nested field",
            envelope(
                "v1",
                "ConfigMap",
                Msg::default().msg(1, Msg::default().str(40, "x")),
            ),
            "ObjectMeta: field number 40",
        ),
        (
            "truncated key",
            ok[..ok.len() - 3].to_vec(),
            "runtime.Unknown: malformed protobuf: truncated varint",
        ),
        (
            "truncated length",
            ok[..ok.len() - 6].to_vec(),
            "runs past the end",
        ),
        (
            "wire type mismatch",
            envelope("v1", "ConfigMap", Msg::default().varint(1, 5)),
            "wire type does not match",
        ),
        (
            "invalid utf-8",
            envelope(
                "v1",
                "ConfigMap",
                Msg::default().msg(1, Msg::default().bytes(1, &[0xff, 0xfe])),
            ),
            "not valid UTF-8",
        ),
        (
            "group wire type",
            {
                let mut b = envelope("v1", "ConfigMap", Msg::default());
                b.extend_from_slice(&[(5 << 3) | 3]);
                b
            },
            "wire type 3",
        ),
        (
            "compressed",
            {
                let unknown = Msg::default()
                    .msg(1, Msg::default().str(1, "v1").str(2, "ConfigMap"))
                    .str(3, "gzip");
                let mut b = MAGIC.to_vec();
                b.extend_from_slice(&unknown.0);
                b
            },
            "contentEncoding \"gzip\"",
        ),
        (
            "endless varint",
            {
                let mut b = MAGIC.to_vec();
                b.extend_from_slice(&[
                    0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ]);
                b
            },
            "varint longer than 10 bytes",
        ),
    ];
    let mut failures = Vec::new();
    for (name, body, want) in cases {
        match transcode(&body) {
            Ok(t) => failures.push(format!("{name}: accepted as {}", t.object)),
            Err(e) if e.to_string().contains(want) => {}
            Err(e) => failures.push(format!("{name}: error {e:?} does not contain {want:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn hostile_nesting_is_refused_not_a_stack_overflow() {
    // JSONSchemaProps.not (field 32... whichever) is recursive; use OwnerReference-free
    // recursion through RawExtension envelopes instead: each level embeds the next.
    let mut body = envelope("v1", "ConfigMap", Msg::default());
    for _ in 0..200 {
        let wrapper = Msg::default()
            .msg(1, Msg::default().str(1, "rev"))
            .msg(2, Msg::default().bytes(1, &body));
        body = envelope("apps/v1", "ControllerRevision", wrapper);
    }
    assert_eq!(transcode(&body), Err(ProtobufError::TooDeep));
}

#[test]
fn go_duration_strings() {
    for (nanos, want) in [
        (0, "0s"),
        (1, "1ns"),
        (1_500, "1.5µs"),
        (150_000_000, "150ms"),
        (1_000_000_000, "1s"),
        (90_000_000_000, "1m30s"),
        (3_600_000_000_000, "1h0m0s"),
        (3_723_500_000_000, "1h2m3.5s"),
        (-2_000_000_000, "-2s"),
    ] {
        assert_eq!(go_duration(nanos), want, "{nanos}ns");
    }
}
