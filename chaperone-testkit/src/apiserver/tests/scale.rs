//! The `scale` subresource over HTTP, as `kubectl scale` (a merge PATCH, or with
//! `--current-replicas`/`--resource-version` a GET then a PUT without a Content-Type),
//! `kubectl get --subresource=scale` and autoscalers use it.

use super::*;

const ALICE_TOKEN: &str = "alice-token";
const JSON: (&str, &str) = ("content-type", "application/json");

/// The kinds with a scale subresource: (resource, kind, object name).
const KINDS: [(&str, &str, &str); 3] = [
    ("deployments", "Deployment", "web"),
    ("statefulsets", "StatefulSet", "db"),
    ("replicasets", "ReplicaSet", "web-5d8f"),
];

fn scale_path(resource: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/default/{resource}/{name}/scale")
}

/// Seeds one object of each kind: 2 replicas wanted, 1 observed, selected by labels and an
/// expression.
fn seed_all(h: &Http) {
    for (_, kind, name) in KINDS {
        h.server
            .seed(json!({
                "apiVersion": "apps/v1", "kind": kind,
                "metadata": {"name": name, "namespace": "default", "generation": 1},
                "spec": {
                    "replicas": 2,
                    "selector": {
                        "matchLabels": {"app": name},
                        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}],
                    },
                    "template": {"metadata": {"labels": {"app": name, "tier": "web"}},
                                 "spec": {"containers": [{"name": "c", "image": "nginx"}]}},
                },
                "status": {"replicas": 1},
            }))
            .unwrap_or_else(|e| panic!("seed {kind}: {e}"));
    }
}

fn stored(h: &Http, resource: &str, name: &str) -> Value {
    h.server
        .object(resource, "default", name)
        .unwrap_or_else(|| panic!("{resource}/{name} not stored"))
}

fn ok_json(reply: &Reply, what: &str) -> Value {
    assert_eq!(reply.status.as_u16(), 200, "{what}: {}", reply.body);
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "{what}"
    );
    reply.json()
}

/// The Scale the real registry derives from `parent`.
fn expected_scale(parent: &Value, name: &str) -> Value {
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": parent["metadata"]["uid"],
            "resourceVersion": parent["metadata"]["resourceVersion"],
            "creationTimestamp": parent["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": parent["spec"]["replicas"]},
        "status": {"replicas": 1, "selector": format!("app={name},tier in (api,web)")},
    })
}

/// method, path, headers, body, expected code, reason, message fragment.
type ScaleErrorCase<'a> = (
    &'a str,
    &'a str,
    Vec<(&'a str, &'a str)>,
    &'a str,
    u16,
    &'a str,
    &'a str,
);

/// token, method, headers, expected code.
type AuthCase<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16);

impl Http {
    async fn call_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut req = self.request(method, path, headers, body);
        let auth = HeaderValue::from_str(&format!("Bearer {token}"))
            .unwrap_or_else(|e| panic!("authorization header: {e}"));
        req.headers_mut().insert("authorization", auth);
        self.send(req).await
    }
}

#[tokio::test]
async fn scale_reads_and_writes_replicas_of_every_replicated_kind() {
    let h = Http::start().await;
    seed_all(&h);
    for (resource, _, name) in KINDS {
        let path = scale_path(resource, name);

        // GET: the parent's identity, replicas and selector.
        let parent = stored(&h, resource, name);
        let scale = ok_json(&h.get(&path).await, &path);
        assert_eq!(scale, expected_scale(&parent, name), "{path}");

        // PUT without a Content-Type (client-go's scale client sends none), with the
        // current resourceVersion as the precondition.
        let mut put = scale.clone();
        put["spec"]["replicas"] = json!(3);
        let reply = h.call("PUT", &path, &[], &put.to_string()).await;
        let updated = ok_json(&reply, &format!("PUT {path}"));
        let parent_after = stored(&h, resource, name);
        assert_eq!(parent_after["spec"]["replicas"], 3, "{parent_after}");
        assert_eq!(
            parent_after["metadata"]["generation"], 2,
            "a spec change bumps the generation: {parent_after}"
        );
        assert_ne!(
            parent_after["metadata"]["resourceVersion"], parent["metadata"]["resourceVersion"],
            "{parent_after}"
        );
        assert_eq!(updated, expected_scale(&parent_after, name), "PUT {path}");

        // Every patch type the server supports applies to the Scale.
        let patches = [
            (
                "application/merge-patch+json",
                r#"{"spec":{"replicas":4}}"#,
                4,
            ),
            (
                "application/strategic-merge-patch+json",
                r#"{"spec":{"replicas":5}}"#,
                5,
            ),
            (
                "application/json-patch+json",
                r#"[{"op":"replace","path":"/spec/replicas","value":6}]"#,
                6,
            ),
            (
                "application/apply-patch+yaml",
                "apiVersion: autoscaling/v1\nkind: Scale\nmetadata:\n  name: NAME\nspec:\n  replicas: 7\n",
                7,
            ),
        ];
        for (content_type, body, want) in patches {
            let body = body.replace("NAME", name);
            let patch_path = format!("{path}?fieldManager=test");
            let reply = h
                .call(
                    "PATCH",
                    &patch_path,
                    &[("content-type", content_type)],
                    &body,
                )
                .await;
            let patched = ok_json(&reply, &format!("PATCH {path} ({content_type})"));
            let parent_now = stored(&h, resource, name);
            assert_eq!(
                parent_now["spec"]["replicas"], want,
                "{content_type}: {parent_now}"
            );
            assert_eq!(patched, expected_scale(&parent_now, name), "{content_type}");
        }

        // Scaling to the current size changes nothing, not even the resourceVersion.
        let before = stored(&h, resource, name);
        let reply = h
            .call(
                "PATCH",
                &path,
                &[("content-type", "application/merge-patch+json")],
                r#"{"spec":{"replicas":7}}"#,
            )
            .await;
        ok_json(&reply, "no-op patch");
        assert_eq!(stored(&h, resource, name), before, "a no-op scale wrote");

        // dryRun answers the new Scale and stores nothing.
        let reply = h
            .call(
                "PATCH",
                &format!("{path}?dryRun=All"),
                &[("content-type", "application/merge-patch+json")],
                r#"{"spec":{"replicas":0}}"#,
            )
            .await;
        let dry = ok_json(&reply, "dry-run patch");
        assert_eq!(
            dry["spec"],
            json!({}),
            "zero replicas are omitted (omitempty): {dry}"
        );
        assert_eq!(stored(&h, resource, name), before, "a dry run wrote");
    }
    h.server.shutdown().await;
}

#[tokio::test]
async fn scale_negotiates_like_other_reads() {
    let h = Http::start().await;
    seed_all(&h);
    let path = scale_path("deployments", "web");
    let cases: Vec<(&str, Result<&str, u16>)> = vec![
        // client-go's typed clients ask for protobuf first; JSON is acceptable.
        (
            "application/vnd.kubernetes.protobuf,application/json",
            Ok("Scale"),
        ),
        ("application/json, */*", Ok("Scale")),
        // The test server speaks no protobuf (see the module docs).
        ("application/vnd.kubernetes.protobuf", Err(406)),
        (
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
            Ok("Table"),
        ),
    ];
    for (accept, want) in cases {
        let reply = h.call("GET", &path, &[("accept", accept)], "").await;
        match want {
            Ok(kind) => assert_eq!(ok_json(&reply, accept)["kind"], kind, "Accept: {accept}"),
            Err(code) => assert_eq!(
                reply.status.as_u16(),
                code,
                "Accept: {accept}: {}",
                reply.body
            ),
        }
    }
    let table = h
        .call(
            "GET",
            &path,
            &[(
                "accept",
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
            )],
            "",
        )
        .await
        .json();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(columns, ["Name", "Desired", "Available"], "{table}");
    assert_eq!(table["rows"][0]["cells"], json!(["web", 2, 1]), "{table}");
    assert_eq!(
        table["rows"][0]["object"]["kind"], "PartialObjectMetadata",
        "{table}"
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn scale_errors_are_the_api_servers() {
    let h = Http::start().await;
    seed_all(&h);
    let web = scale_path("deployments", "web");
    let parent = stored(&h, "deployments", "web");
    let uid = parent["metadata"]["uid"].as_str().unwrap_or_default();
    let scale = |replicas: Value, extra_meta: Value| {
        let mut meta = json!({"name": "web", "namespace": "default"});
        if let (Some(m), Some(extra)) = (meta.as_object_mut(), extra_meta.as_object()) {
            m.extend(extra.clone());
        }
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": meta, "spec": {"replicas": replicas}})
            .to_string()
    };
    let stale = scale(json!(3), json!({"resourceVersion": "1"}));
    let wrong_uid = scale(json!(3), json!({"uid": "not-the-uid"}));
    let negative = scale(json!(-1), json!({}));
    let not_a_number = scale(json!("three"), json!({}));
    let other_name = scale(json!(3), json!({"name": "other"}));
    let other_namespace = scale(json!(3), json!({"namespace": "kube-system"}));
    let missing = scale(json!(3), json!({"name": "missing"}));
    let deployment_body =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}})
            .to_string();
    let missing_sts = scale_path("statefulsets", "missing");
    let missing_rs = scale_path("replicasets", "missing");
    let missing_deploy = scale_path("deployments", "missing");
    let merge = ("content-type", "application/merge-patch+json");
    let web_apply = format!("{web}?fieldManager=test");
    let cases: Vec<ScaleErrorCase<'_>> = vec![
        (
            "PUT",
            &web,
            vec![JSON],
            &stale,
            409,
            "Conflict",
            "Operation cannot be fulfilled on deployments.apps \"web\": the object has been modified; please apply your changes to the latest version and try again",
        ),
        (
            "PATCH",
            &web,
            vec![merge],
            r#"{"metadata":{"resourceVersion":"1"},"spec":{"replicas":3}}"#,
            409,
            "Conflict",
            "Operation cannot be fulfilled on deployments.apps \"web\": the object has been modified",
        ),
        (
            "PUT",
            &web,
            vec![JSON],
            &wrong_uid,
            409,
            "Conflict",
            "Operation cannot be fulfilled on deployments/scale.apps \"web\": Precondition failed: UID in precondition: not-the-uid, UID in object meta: ",
        ),
        (
            "GET",
            &missing_deploy,
            vec![],
            "",
            404,
            "NotFound",
            "deployments.apps \"missing\" not found",
        ),
        (
            "PUT",
            &missing_deploy,
            vec![JSON],
            &missing,
            404,
            "NotFound",
            "deployments.apps \"missing\" not found",
        ),
        (
            "PATCH",
            &missing_sts,
            vec![merge],
            r#"{"spec":{"replicas":3}}"#,
            404,
            "NotFound",
            "statefulsets.apps \"missing\" not found",
        ),
        (
            "GET",
            &missing_rs,
            vec![],
            "",
            404,
            "NotFound",
            "replicasets.apps \"missing\" not found",
        ),
        (
            "PUT",
            &web,
            vec![JSON],
            &negative,
            422,
            "Invalid",
            "Scale.autoscaling \"web\" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0",
        ),
        (
            "PATCH",
            &web,
            vec![merge],
            r#"{"spec":{"replicas":-2}}"#,
            422,
            "Invalid",
            "spec.replicas: Invalid value: -2: must be greater than or equal to 0",
        ),
        (
            "PUT",
            &web,
            vec![JSON],
            &not_a_number,
            400,
            "BadRequest",
            "json: cannot unmarshal string into Go struct field ScaleSpec.spec.replicas of type int32",
        ),
        (
            "PUT",
            &web,
            vec![JSON],
            &other_name,
            400,
            "BadRequest",
            "the name of the object (other) does not match the name on the URL (web)",
        ),
        (
            "PUT",
            &web,
            vec![JSON],
            &other_namespace,
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
        ),
        (
            "PUT",
            &web,
            vec![JSON],
            &deployment_body,
            400,
            "BadRequest",
            "the API version in the data (apps/v1) does not match the expected API version (autoscaling/v1)",
        ),
        (
            "PUT",
            &web,
            vec![("content-type", "application/vnd.kubernetes.protobuf")],
            "k8s\0",
            415,
            "UnsupportedMediaType",
            "unknown format",
        ),
        (
            "PATCH",
            &web,
            vec![("content-type", "text/plain")],
            "replicas=3",
            415,
            "UnsupportedMediaType",
            "application/merge-patch+json",
        ),
        (
            "PATCH",
            &web_apply,
            vec![("content-type", "application/apply-patch+yaml")],
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n",
            400,
            "BadRequest",
            "does not match the expected API version (autoscaling/v1)",
        ),
        ("DELETE", &web, vec![], "", 405, "MethodNotAllowed", ""),
    ];
    for (method, path, headers, body, code, reason, message) in cases {
        let reply = h.call(method, path, &headers, body).await;
        assert_status(&reply, code, reason, message);
        // The uid conflict names the parent's uid, which the table cannot spell out.
        if message.ends_with("UID in object meta: ") {
            assert!(reply.body.contains(uid), "{}", reply.body);
        }
    }
    let not_found = h.get(&missing_deploy).await.json();
    assert_eq!(
        not_found["details"],
        json!({"name": "missing", "group": "apps", "kind": "deployments"}),
        "{not_found}"
    );
    assert_eq!(
        stored(&h, "deployments", "web"),
        parent,
        "a refused scale request changed the deployment"
    );
    // Only replicated apps kinds have the subresource.
    assert_status(
        &h.get("/api/v1/namespaces/default/pods/web/scale").await,
        404,
        "NotFound",
        "the server could not find the requested resource",
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn scale_is_authorized() {
    let h = Http::start_with(
        ApiServerConfig::with_tokens([TOKEN])
            .with_token_user(ALICE_TOKEN, UserInfo::new("alice", ["dev"]))
            .with_authorizer(
                Authorizer::allow_all().deny(
                    Denial::user("alice", "update", DenialTarget::resource("*/scale"))
                        .because("alice may not resize"),
                ),
            ),
    )
    .await;
    seed_all(&h);
    let web = scale_path("deployments", "web");
    let body = json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "web"}, "spec": {"replicas": 9}}).to_string();
    let merge = [("content-type", "application/merge-patch+json")];
    let as_alice = [("impersonate-user", "alice")];
    let cases: Vec<AuthCase<'_>> = vec![
        (ALICE_TOKEN, "GET", &[], 200),
        (ALICE_TOKEN, "PUT", &[], 403),
        // The denial names `update`; a merge patch is the `patch` verb.
        (ALICE_TOKEN, "PATCH", &merge, 200),
        (TOKEN, "PUT", &[], 200),
        // The administrator acting as alice is alice.
        (TOKEN, "PUT", &as_alice, 403),
    ];
    for (token, method, headers, code) in cases {
        let payload = if method == "PATCH" {
            r#"{"spec":{"replicas":4}}"#
        } else if method == "PUT" {
            body.as_str()
        } else {
            ""
        };
        let reply = h.call_as(token, method, &web, headers, payload).await;
        assert_eq!(
            reply.status.as_u16(),
            code,
            "{token} {method} {headers:?}: {}",
            reply.body
        );
        if code == 403 {
            assert_status(
                &reply,
                403,
                "Forbidden",
                "deployments.apps \"web\" is forbidden: User \"alice\" cannot update resource \"deployments/scale\" in API group \"apps\" in the namespace \"default\": alice may not resize",
            );
            assert_eq!(
                reply.json()["details"],
                json!({"name": "web", "group": "apps", "kind": "deployments"}),
            );
        }
    }
    assert_eq!(stored(&h, "deployments", "web")["spec"]["replicas"], 9);
    // A denied write leaves the object alone.
    let before = stored(&h, "statefulsets", "db");
    let reply = h
        .call_as(
            ALICE_TOKEN,
            "PUT",
            &scale_path("statefulsets", "db"),
            &[],
            &body.replace("\"web\"", "\"db\""),
        )
        .await;
    assert_eq!(reply.status.as_u16(), 403, "{}", reply.body);
    assert_eq!(stored(&h, "statefulsets", "db"), before);
    // Impersonation headers without a user: the impersonation filter's plain-text 500.
    let reply = h
        .call("GET", &web, &[("impersonate-group", "dev")], "")
        .await;
    assert_eq!(reply.status.as_u16(), 500, "{}", reply.body);
    assert!(
        reply.body.contains("without impersonating a user"),
        "{}",
        reply.body
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn discovery_lists_scale_as_autoscaling_v1() {
    let h = Http::start().await;
    let legacy = ok_json(&h.get("/apis/apps/v1").await, "/apis/apps/v1");
    let names: Vec<&str> = legacy["resources"]
        .as_array()
        .map(|rs| rs.iter().filter_map(|r| r["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        [
            "deployments",
            "deployments/scale",
            "deployments/status",
            "replicasets",
            "replicasets/scale",
            "replicasets/status",
            "statefulsets",
            "statefulsets/scale",
            "statefulsets/status"
        ],
        "{legacy}"
    );
    let aggregated = h
        .call(
            "GET",
            "/apis",
            &[(
                "accept",
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
            )],
            "",
        )
        .await
        .json();
    let apps = aggregated["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["metadata"]["name"] == "apps"))
        .unwrap_or_else(|| panic!("no apps group: {aggregated}"));
    for (resource, kind, _) in KINDS {
        let entry = legacy["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == format!("{resource}/scale")))
            .unwrap_or_else(|| panic!("{resource}/scale missing: {legacy}"));
        assert_eq!(
            entry,
            &json!({
                "name": format!("{resource}/scale"),
                "singularName": "",
                "namespaced": true,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            })
        );
        let agg = apps["versions"][0]["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["resource"] == resource))
            .unwrap_or_else(|| panic!("{resource} missing: {apps}"));
        assert_eq!(agg["responseKind"]["kind"], kind, "{agg}");
        assert_eq!(
            agg["subresources"],
            json!([
                {"subresource": "scale",
                 "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
                 "verbs": ["get", "patch", "update"]},
                {"subresource": "status",
                 "responseKind": {"group": "apps", "version": "v1", "kind": kind},
                 "verbs": ["get", "patch", "update"]},
            ]),
            "{resource}"
        );
    }
    // Core resources have no scale subresource.
    let core = ok_json(&h.get("/api/v1").await, "/api/v1");
    assert!(
        !core.to_string().contains("/scale"),
        "a core resource lists scale: {core}"
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn replicated_kinds_default_replicas_and_count_generations() {
    let h = Http::start().await;
    for (resource, kind, name) in KINDS {
        let path = format!("/apis/apps/v1/namespaces/default/{resource}");
        let body = json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name},
                          "spec": {"selector": {"matchLabels": {"app": name}}}});
        let created = h.call("POST", &path, &[JSON], &body.to_string()).await;
        assert_eq!(created.status.as_u16(), 201, "{}", created.body);
        let created = created.json();
        assert_eq!(created["spec"]["replicas"], 1, "{created}");
        assert_eq!(created["metadata"]["generation"], 1, "{created}");
        let scale = ok_json(&h.get(&scale_path(resource, name)).await, resource);
        assert_eq!(scale["spec"]["replicas"], 1, "{scale}");
        assert_eq!(scale["status"]["replicas"], 0, "{scale}");
        assert_eq!(
            scale["status"]["selector"],
            format!("app={name}"),
            "{scale}"
        );
        // A status write is not a spec change.
        let status = h
            .call(
                "PATCH",
                &format!("{path}/{name}/status"),
                &[("content-type", "application/merge-patch+json")],
                r#"{"status":{"replicas":1}}"#,
            )
            .await;
        let status = ok_json(&status, "status patch");
        assert_eq!(status["metadata"]["generation"], 1, "{status}");
        assert_eq!(status["spec"]["replicas"], 1, "{status}");
    }
    h.server.shutdown().await;
}
