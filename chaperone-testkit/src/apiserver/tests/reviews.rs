//! The review APIs over HTTP, as `kubectl auth can-i [--list]`, `kubectl auth whoami` and a
//! TokenReview client call them (in JSON: kubectl 1.32 sends these bodies as protobuf, which
//! the gateway transcodes).

use super::*;

const SSAR: &str = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
const SSRR: &str = "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews";
const SAR: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
const SSR: &str = "/apis/authentication.k8s.io/v1/selfsubjectreviews";
const TOKEN_REVIEW: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const ALICE_TOKEN: &str = "alice-token";
const SA_TOKEN: &str = "web-token";
const KUBECTL_UA: &str = "kubectl/v1.32.4 (linux/amd64) kubernetes/59526cd";

/// `tok` is the administrator, `alice-token` is alice (group dev), `web-token` is the
/// prod/web service account. Alice may not delete nodes, service accounts may not read
/// secrets, the dev group may not touch pods in `prod`, nobody may read `/metrics`.
fn config() -> ApiServerConfig {
    ApiServerConfig::with_tokens([TOKEN])
        .with_token_user(ALICE_TOKEN, UserInfo::new("alice", ["dev"]))
        .with_token_user(SA_TOKEN, UserInfo::service_account("prod", "web"))
        .with_authorizer(
            resource_denials().deny(Denial::anyone("get", DenialTarget::path("/metrics"))),
        )
}

fn resource_denials() -> Authorizer {
    Authorizer::allow_all()
        .deny(
            Denial::user("alice", "delete", DenialTarget::resource("nodes"))
                .because("alice may not delete nodes"),
        )
        .deny(Denial::group(
            "system:serviceaccounts",
            "get",
            ResourceMatch::new("secrets").in_api_group(""),
        ))
        .deny(Denial::group(
            "dev",
            "*",
            ResourceMatch::new("pods").in_namespace("prod"),
        ))
}

impl Http {
    /// A POST (or other method) with `token` as the bearer token and JSON by default.
    async fn as_user(
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
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
        }
        self.send(req).await
    }
}

fn created(reply: &Reply) -> Value {
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.body);
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
    reply.json()
}

fn ssar_resource(verb: &str, group: &str, resource: &str, namespace: &str) -> String {
    json!({
        "kind": "SelfSubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"resourceAttributes": {"namespace": namespace, "verb": verb, "group": group, "resource": resource}},
        "status": {"allowed": false},
    })
    .to_string()
}

fn ssar_path(verb: &str, path: &str) -> String {
    json!({"spec": {"nonResourceAttributes": {"verb": verb, "path": path}}}).to_string()
}

/// token, impersonation headers, body, then (allowed, denied, reason).
type AccessCase = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    String,
    (bool, bool, &'static str),
);

#[tokio::test]
async fn self_subject_access_reviews_follow_the_authorizer() {
    let h = Http::start_with(config()).await;
    let allowed = (true, false, "");
    let denied = |reason| (false, true, reason);
    let sa = ("impersonate-user", "system:serviceaccount:prod:web");
    let cases: Vec<AccessCase> = vec![
        (
            TOKEN,
            vec![],
            ssar_resource("get", "", "pods", "default"),
            allowed,
        ),
        (
            TOKEN,
            vec![],
            ssar_resource("delete", "", "nodes", "default"),
            allowed,
        ),
        (
            ALICE_TOKEN,
            vec![],
            ssar_resource("get", "", "pods", "default"),
            allowed,
        ),
        (
            ALICE_TOKEN,
            vec![],
            ssar_resource("delete", "", "nodes", "default"),
            denied("alice may not delete nodes"),
        ),
        // `kubectl auth can-i '*' '*'` asks about everything, denied things included.
        (
            ALICE_TOKEN,
            vec![],
            ssar_resource("*", "*", "*", ""),
            denied("alice may not delete nodes"),
        ),
        (
            ALICE_TOKEN,
            vec![],
            ssar_resource("list", "", "pods", "prod"),
            denied(""),
        ),
        (
            ALICE_TOKEN,
            vec![],
            ssar_resource("list", "", "pods", "default"),
            allowed,
        ),
        // The gateway impersonates: the impersonated identity is the one checked.
        (
            TOKEN,
            vec![("impersonate-user", "alice")],
            ssar_resource("delete", "", "nodes", ""),
            denied("alice may not delete nodes"),
        ),
        (
            TOKEN,
            vec![sa],
            ssar_resource("get", "", "secrets", "prod"),
            denied(""),
        ),
        (
            TOKEN,
            vec![sa],
            ssar_resource("get", "apps", "secrets", "prod"),
            allowed,
        ),
        // Explicit groups replace the service-account groups the denial names.
        (
            TOKEN,
            vec![sa, ("impersonate-group", "other")],
            ssar_resource("get", "", "secrets", "prod"),
            allowed,
        ),
        (
            TOKEN,
            vec![("impersonate-user", "bob"), ("impersonate-group", "dev")],
            ssar_resource("delete", "", "pods", "prod"),
            denied(""),
        ),
        (
            SA_TOKEN,
            vec![],
            ssar_resource("get", "", "secrets", "prod"),
            denied(""),
        ),
        (
            SA_TOKEN,
            vec![],
            ssar_resource("get", "", "configmaps", "prod"),
            allowed,
        ),
        (TOKEN, vec![], ssar_path("get", "/metrics"), denied("")),
        (TOKEN, vec![], ssar_path("get", "/healthz"), allowed),
        (TOKEN, vec![], ssar_path("post", "/metrics"), allowed),
    ];
    for (token, headers, body, (allowed, denied, reason)) in cases {
        let reply = h.as_user(token, "POST", SSAR, &headers, &body).await;
        let v = created(&reply);
        let mut want = json!({"allowed": allowed});
        if denied {
            want["denied"] = Value::Bool(true);
        }
        if !reason.is_empty() {
            want["reason"] = Value::from(reason);
        }
        assert_eq!(v["status"], want, "{token} {headers:?} {body}");
    }
    h.server.shutdown().await;
}

#[tokio::test]
async fn self_subject_access_review_echoes_like_the_api_server() {
    let h = Http::start_with(config()).await;
    // What kubectl sends for `kubectl auth can-i list jobs.batch/nightly`, plus an unknown
    // field and empty strings, which Go's types drop.
    let body = json!({
        "kind": "SelfSubjectAccessReview",
        "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": null, "namespace": "ignored-for-cluster-scope"},
        "spec": {
            "resourceAttributes": {"namespace": "default", "verb": "list", "group": "batch", "resource": "jobs", "name": "nightly", "subresource": "", "bogus": 1},
            "unknown": true,
        },
        "status": {"allowed": false},
    });
    let reply = h
        .as_user(
            TOKEN,
            "POST",
            SSAR,
            &[("user-agent", KUBECTL_UA)],
            &body.to_string(),
        )
        .await;
    let mut v = created(&reply);
    let time = v
        .pointer_mut("/metadata/managedFields/0/time")
        .map(Value::take)
        .unwrap_or(Value::Null);
    assert!(
        time.as_str()
            .is_some_and(|t| t.len() == 20 && t.ends_with('Z')),
        "managedFields time {time}"
    );
    assert_eq!(
        v,
        json!({
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {
                "creationTimestamp": null,
                "managedFields": [{
                    "manager": "kubectl",
                    "operation": "Update",
                    "apiVersion": "authorization.k8s.io/v1",
                    "time": null,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:resourceAttributes": {".": {}, "f:group": {}, "f:name": {}, "f:namespace": {}, "f:resource": {}, "f:verb": {}}}},
                }],
            },
            "spec": {"resourceAttributes": {"namespace": "default", "verb": "list", "group": "batch", "resource": "jobs", "name": "nightly"}},
            "status": {"allowed": true},
        })
    );
    // `?fieldManager=` wins over the user agent; YAML bodies are accepted too.
    let yaml = "spec:\n  nonResourceAttributes:\n    path: /healthz\n    verb: get\n";
    let reply = h
        .as_user(
            TOKEN,
            "POST",
            &format!("{SSAR}?fieldManager=tester"),
            &[
                ("content-type", "application/yaml"),
                ("user-agent", KUBECTL_UA),
            ],
            yaml,
        )
        .await;
    let v = created(&reply);
    assert_eq!(
        v["metadata"]["managedFields"][0]["manager"], "tester",
        "{v}"
    );
    assert_eq!(
        v["spec"],
        json!({"nonResourceAttributes": {"path": "/healthz", "verb": "get"}})
    );
    assert_eq!(v["status"], json!({"allowed": true}));
    h.server.shutdown().await;
}

/// content type, body, then the expected code, reason and message fragment.
type BadBody = (&'static str, &'static str, u16, &'static str, &'static str);

#[tokio::test]
async fn bad_review_bodies_get_status_errors() {
    let h = Http::start_with(config()).await;
    let json_ct = "application/json";
    let cases: Vec<BadBody> = vec![
        (
            json_ct,
            "nope",
            400,
            "BadRequest",
            "the object provided is unrecognized (must be of type SelfSubjectAccessReview): couldn't get version/kind; json parse error: ",
        ),
        (json_ct, "nope", 400, "BadRequest", "(6e6f7065)"),
        (json_ct, "", 400, "BadRequest", "(<empty>)"),
        (json_ct, "{\"spec\":", 400, "BadRequest", "({\"spec\":)"),
        (
            json_ct,
            "[1]",
            400,
            "BadRequest",
            "json parse error: json: cannot unmarshal array into Go value of type struct",
        ),
        // No spec: the real server decodes an empty review and its validation refuses it.
        (
            json_ct,
            "{}",
            422,
            "Invalid",
            ".authorization.k8s.io \"\" is invalid: spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified",
        ),
        (
            json_ct,
            "null",
            422,
            "Invalid",
            "exactly one of nonResourceAttributes",
        ),
        (
            json_ct,
            "{\"spec\":null}",
            422,
            "Invalid",
            "exactly one of nonResourceAttributes",
        ),
        (
            json_ct,
            "{\"spec\":{\"resourceAttributes\":{},\"nonResourceAttributes\":{\"path\":\"/x\"}}}",
            422,
            "Invalid",
            "spec.nonResourceAttributes: Invalid value: authorization.NonResourceAttributes{Path:\"/x\", Verb:\"\"}: cannot be specified in combination with resourceAttributes",
        ),
        (
            json_ct,
            "{\"metadata\":{\"name\":\"x\"},\"spec\":{\"resourceAttributes\":{}}}",
            422,
            "Invalid",
            "metadata: Invalid value: ",
        ),
        (
            json_ct,
            "{\"spec\":\"pods\"}",
            400,
            "BadRequest",
            "SelfSubjectAccessReview in version \"v1\" cannot be handled as a SelfSubjectAccessReview: spec: ",
        ),
        (
            json_ct,
            "{\"spec\":{\"resourceAttributes\":{\"verb\":5}}}",
            400,
            "BadRequest",
            "cannot be handled as a SelfSubjectAccessReview: spec.resourceAttributes.verb: ",
        ),
        (
            json_ct,
            "{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"spec\":{}}",
            400,
            "BadRequest",
            "the API version in the data (v1) does not match the expected API version (authorization.k8s.io/v1)",
        ),
        (
            json_ct,
            "{\"apiVersion\":\"authorization.k8s.io/v1\",\"kind\":\"SubjectAccessReview\",\"spec\":{}}",
            400,
            "BadRequest",
            "the kind in the data (SubjectAccessReview) does not match the expected kind (SelfSubjectAccessReview)",
        ),
        // kubectl 1.32's typed client: the test server does not decode protobuf.
        (
            "application/vnd.kubernetes.protobuf",
            "k8s\u{0}",
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format (application/vnd.kubernetes.protobuf)",
        ),
        (
            "text/plain",
            "{}",
            415,
            "UnsupportedMediaType",
            "(text/plain)",
        ),
    ];
    for (content_type, body, code, reason, message) in cases {
        let reply = h
            .as_user(TOKEN, "POST", SSAR, &[("content-type", content_type)], body)
            .await;
        assert_status(&reply, code, reason, message);
    }
    // Invalid errors carry the group; the kind is empty as in the real server.
    let reply = h.as_user(TOKEN, "POST", SSAR, &[], "{}").await;
    assert_eq!(
        reply.json()["details"],
        json!({"group": "authorization.k8s.io"})
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn review_paths_are_create_only() {
    let h = Http::start_with(config()).await;
    let collections = [
        SSAR,
        SSRR,
        SAR,
        "/apis/authorization.k8s.io/v1/namespaces/default/localsubjectaccessreviews",
        SSR,
        TOKEN_REVIEW,
    ];
    for path in collections {
        for method in ["GET", "PUT", "PATCH", "DELETE"] {
            assert_status(
                &h.call(method, path, &[], "").await,
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            );
        }
        let watch = h.get(&format!("{path}?watch=true")).await;
        assert_status(&watch, 405, "MethodNotAllowed", "");
        assert_eq!(watch.json()["details"], json!({}), "{path}");
        assert_status(
            &h.get(&format!("{path}/some-name")).await,
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    for path in [
        // Namespaced only inside a namespace, cluster-scoped never.
        "/apis/authorization.k8s.io/v1/localsubjectaccessreviews",
        "/apis/authorization.k8s.io/v1/namespaces/default/selfsubjectaccessreviews",
        "/apis/authorization.k8s.io/v1/watch/selfsubjectaccessreviews",
        "/apis/authorization.k8s.io/v1/roles",
        "/apis/authorization.k8s.io/v1beta1/selfsubjectaccessreviews",
        "/apis/authentication.k8s.io/v1/namespaces/default/tokenreviews",
    ] {
        assert_status(
            &h.call("POST", path, &[], "{}").await,
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    // Never stored: nothing to read back, nothing in the store.
    let rv = h.server.resource_version();
    h.as_user(
        TOKEN,
        "POST",
        SSAR,
        &[],
        &ssar_resource("get", "", "pods", "d"),
    )
    .await;
    assert_eq!(h.server.resource_version(), rv);
    h.server.shutdown().await;
}

#[tokio::test]
async fn review_apis_are_discovered() {
    let h = Http::start_with(config()).await;
    let groups = h.get("/apis").await.json();
    for group in ["authentication.k8s.io", "authorization.k8s.io"] {
        assert!(
            groups["groups"]
                .as_array()
                .is_some_and(|gs| gs.iter().any(|g| g["name"] == group)),
            "{group} not in {groups}"
        );
        let doc = h.get(&format!("/apis/{group}")).await.json();
        assert_eq!(doc["kind"], "APIGroup");
        assert_eq!(doc["preferredVersion"]["version"], "v1");
    }
    let list = h.get("/apis/authorization.k8s.io/v1").await.json();
    let mut names: Vec<&str> = list["resources"]
        .as_array()
        .map(|rs| rs.iter().filter_map(|r| r["name"].as_str()).collect())
        .unwrap_or_default();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "localsubjectaccessreviews",
            "selfsubjectaccessreviews",
            "selfsubjectrulesreviews",
            "subjectaccessreviews"
        ]
    );
    let list = h.get("/apis/authentication.k8s.io/v1").await.json();
    assert_eq!(
        list["resources"],
        json!([
            {"name": "selfsubjectreviews", "singularName": "selfsubjectreview", "namespaced": false, "kind": "SelfSubjectReview", "verbs": ["create"]},
            {"name": "tokenreviews", "singularName": "tokenreview", "namespaced": false, "kind": "TokenReview", "verbs": ["create"]},
        ])
    );
    let agg =
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
    let aggregated = h.call("GET", "/apis", &[("accept", agg)], "").await.json();
    let item = aggregated["items"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find(|i| i["metadata"]["name"] == "authorization.k8s.io")
        })
        .unwrap_or_else(|| panic!("authorization.k8s.io not aggregated: {aggregated}"));
    let lsar = item["versions"][0]["resources"]
        .as_array()
        .and_then(|rs| {
            rs.iter()
                .find(|r| r["resource"] == "localsubjectaccessreviews")
        })
        .unwrap_or_else(|| panic!("no localsubjectaccessreviews in {item}"));
    assert_eq!(lsar["scope"], "Namespaced");
    assert_eq!(lsar["verbs"], json!(["create"]));
    assert_eq!(lsar["responseKind"]["kind"], "LocalSubjectAccessReview");
    h.server.shutdown().await;
}

/// token, impersonation headers, namespace, then whether the answer is incomplete.
type RulesCase = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static str,
    bool,
);

#[tokio::test]
async fn self_subject_rules_reviews() {
    let h = Http::start_with(config().with_authorizer(resource_denials())).await;
    let cases: Vec<RulesCase> = vec![
        (TOKEN, vec![], "default", false),
        // Alice's node denial is cluster-wide; the dev group's only applies in prod.
        (ALICE_TOKEN, vec![], "default", true),
        (
            TOKEN,
            vec![("impersonate-user", "bob"), ("impersonate-group", "dev")],
            "default",
            false,
        ),
        (
            TOKEN,
            vec![("impersonate-user", "bob"), ("impersonate-group", "dev")],
            "prod",
            true,
        ),
        (SA_TOKEN, vec![], "prod", true),
    ];
    for (token, headers, namespace, incomplete) in cases {
        let body = json!({
            "kind": "SelfSubjectRulesReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": {"namespace": namespace},
            "status": {"resourceRules": null, "nonResourceRules": null, "incomplete": false},
        });
        let reply = h
            .as_user(token, "POST", SSRR, &headers, &body.to_string())
            .await;
        let v = created(&reply);
        let mut status = json!({
            "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
            "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
            "incomplete": incomplete,
        });
        if incomplete {
            status["evaluationError"] = Value::from(
                "the test API server denies this user some requests, and denials cannot be listed as rules",
            );
        }
        assert_eq!(
            v,
            json!({
                "kind": "SelfSubjectRulesReview",
                "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": null},
                "spec": {},
                "status": status,
            }),
            "{token} {headers:?} {namespace}"
        );
    }
    // A denial of a non-resource URL applies in every namespace.
    h.server.set_authorizer(
        Authorizer::allow_all().deny(Denial::anyone("get", DenialTarget::path("/metrics"))),
    );
    let v = created(
        &h.as_user(
            TOKEN,
            "POST",
            SSRR,
            &[],
            "{\"spec\":{\"namespace\":\"default\"}}",
        )
        .await,
    );
    assert_eq!(v["status"]["incomplete"], true, "{v}");
    for body in ["{}", "{\"spec\":{\"namespace\":\"\"}}"] {
        assert_status(
            &h.as_user(TOKEN, "POST", SSRR, &[], body).await,
            400,
            "BadRequest",
            "no namespace on request",
        );
    }
    h.server.shutdown().await;
}

/// token, impersonation headers, then the expected `status.userInfo`.
type WhoamiCase = (&'static str, Vec<(&'static str, &'static str)>, Value);

#[tokio::test]
async fn self_subject_reviews_say_who_is_asking() {
    let h = Http::start_with(config()).await;
    let cases: Vec<WhoamiCase> = vec![
        (
            TOKEN,
            vec![],
            json!({"username": "system:admin", "groups": ["system:masters", "system:authenticated"]}),
        ),
        (
            ALICE_TOKEN,
            vec![],
            json!({"username": "alice", "groups": ["dev", "system:authenticated"]}),
        ),
        (
            SA_TOKEN,
            vec![],
            json!({"username": "system:serviceaccount:prod:web", "groups": ["system:serviceaccounts", "system:serviceaccounts:prod", "system:authenticated"]}),
        ),
        (
            TOKEN,
            vec![
                ("impersonate-user", "bob"),
                ("impersonate-group", "a"),
                ("impersonate-group", "b"),
                ("impersonate-uid", "1234"),
                ("impersonate-extra-scopes", "view"),
                ("impersonate-extra-scopes", "edit"),
            ],
            json!({"username": "bob", "uid": "1234", "groups": ["a", "b", "system:authenticated"], "extra": {"scopes": ["view", "edit"]}}),
        ),
        (
            TOKEN,
            vec![("impersonate-user", "system:serviceaccount:ns1:robot")],
            json!({"username": "system:serviceaccount:ns1:robot", "groups": ["system:serviceaccounts", "system:serviceaccounts:ns1", "system:authenticated"]}),
        ),
        (
            TOKEN,
            vec![("impersonate-user", "system:anonymous")],
            json!({"username": "system:anonymous", "groups": ["system:unauthenticated"]}),
        ),
    ];
    // What kubectl auth whoami sends.
    let body = json!({
        "kind": "SelfSubjectReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": {}},
    })
    .to_string();
    for (token, headers, user_info) in cases {
        let reply = h.as_user(token, "POST", SSR, &headers, &body).await;
        let mut v = created(&reply);
        let created_at = v
            .pointer_mut("/metadata/creationTimestamp")
            .map(Value::take)
            .unwrap_or(Value::Null);
        assert!(
            created_at
                .as_str()
                .is_some_and(|t| t.len() == 20 && t.ends_with('Z')),
            "creationTimestamp {created_at}"
        );
        assert_eq!(
            v,
            json!({
                "kind": "SelfSubjectReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": null},
                "status": {"userInfo": user_info},
            }),
            "{token} {headers:?}"
        );
    }
    // Impersonating a group without a user is the impersonation filter's plain-text 500.
    let reply = h
        .as_user(
            TOKEN,
            "POST",
            SSR,
            &[("impersonate-group", "system:masters")],
            &body,
        )
        .await;
    assert_eq!(reply.status.as_u16(), 500, "{}", reply.body);
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/plain; charset=utf-8"[..])
    );
    assert_eq!(
        reply.body,
        format!(
            "Internal Server Error: \"{SSR}\": requested [{{Group  system:masters    }}] without impersonating a user\n"
        )
    );
    // The impersonation filter answers before the body is read.
    let garbage = h
        .as_user(TOKEN, "POST", SSAR, &[("impersonate-uid", "u")], "nope")
        .await;
    assert_eq!(garbage.status.as_u16(), 500, "{}", garbage.body);
    assert_status(
        &h.as_user(
            TOKEN,
            "POST",
            SSR,
            &[],
            "{\"status\":{\"userInfo\":{\"username\":1}}}",
        )
        .await,
        400,
        "BadRequest",
        "SelfSubjectReview in version \"v1\" cannot be handled as a SelfSubjectReview: status.userInfo.username",
    );
    assert_status(
        &h.as_user("wrong", "POST", SSR, &[], &body).await,
        401,
        "Unauthorized",
        "Unauthorized",
    );
    h.server.shutdown().await;

    // Without authentication every request is anonymous.
    let open = Http::start_with(ApiServerConfig::default()).await;
    let v = created(&open.as_user("anything", "POST", SSR, &[], &body).await);
    assert_eq!(
        v["status"]["userInfo"],
        json!({"username": "system:anonymous", "groups": ["system:unauthenticated"]})
    );
    open.server.shutdown().await;
}

#[tokio::test]
async fn token_users_authenticate_ordinary_requests() {
    let h = Http::start_with(
        ApiServerConfig::default().with_token_user(ALICE_TOKEN, UserInfo::new("alice", ["dev"])),
    )
    .await;
    let cases = [(ALICE_TOKEN, 200), (TOKEN, 401), ("", 401)];
    for (token, code) in cases {
        let reply = h.as_user(token, "GET", "/api/v1/namespaces", &[], "").await;
        assert_eq!(reply.status.as_u16(), code, "{token:?}: {}", reply.body);
    }
    h.server.shutdown().await;
}

/// body, then the expected status (allowed, denied, reason), or a 422 message fragment.
type SarCase = (Value, Result<Value, &'static str>);

#[tokio::test]
async fn subject_access_reviews_check_the_named_subject() {
    let h = Http::start_with(config()).await;
    let attrs = |verb: &str, resource: &str, ns: &str| {
        let mut attrs = json!({"verb": verb, "resource": resource});
        if !ns.is_empty() {
            attrs["namespace"] = Value::from(ns);
        }
        attrs
    };
    let cases: Vec<SarCase> = vec![
        (
            json!({"spec": {"user": "alice", "resourceAttributes": attrs("delete", "nodes", "")}}),
            Ok(json!({"allowed": false, "denied": true, "reason": "alice may not delete nodes"})),
        ),
        (
            json!({"spec": {"user": "bob", "resourceAttributes": attrs("delete", "nodes", "")}}),
            Ok(json!({"allowed": true})),
        ),
        (
            json!({"spec": {"groups": ["system:serviceaccounts"], "resourceAttributes": attrs("get", "secrets", "x")}}),
            Ok(json!({"allowed": false, "denied": true})),
        ),
        // No system:authenticated is added: the subject is exactly what the spec says.
        (
            json!({"spec": {"user": "carol", "nonResourceAttributes": {"verb": "get", "path": "/metrics"}}}),
            Ok(json!({"allowed": false, "denied": true})),
        ),
        (
            json!({"spec": {"resourceAttributes": attrs("get", "pods", "d")}}),
            Err("spec.user: Invalid value: \"\": at least one of user or group must be specified"),
        ),
        (
            json!({"spec": {}}),
            Err(
                "[spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified, spec.user: Invalid value: \"\": at least one of user or group must be specified]",
            ),
        ),
    ];
    for (body, want) in cases {
        let reply = h
            .as_user(
                TOKEN,
                "POST",
                SAR,
                &[("user-agent", KUBECTL_UA)],
                &body.to_string(),
            )
            .await;
        match want {
            Ok(status) => {
                let v = created(&reply);
                assert_eq!(v["kind"], "SubjectAccessReview");
                assert_eq!(v["spec"], body["spec"], "spec echoed");
                assert_eq!(v["status"], status, "{body}");
            }
            Err(message) => assert_status(&reply, 422, "Invalid", message),
        }
    }
    // The echo's managedFields name each spec field, with "." on the structs they own.
    let body = json!({"spec": {"user": "u", "groups": ["g"], "extra": {"k": ["v"]}, "resourceAttributes": attrs("get", "pods", "d")}});
    let v = created(
        &h.as_user(
            TOKEN,
            "POST",
            SAR,
            &[("user-agent", KUBECTL_UA)],
            &body.to_string(),
        )
        .await,
    );
    assert_eq!(
        v["metadata"]["managedFields"][0]["fieldsV1"],
        json!({"f:spec": {
            "f:extra": {".": {}, "f:k": {}},
            "f:groups": {},
            "f:resourceAttributes": {".": {}, "f:namespace": {}, "f:resource": {}, "f:verb": {}},
            "f:user": {},
        }})
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn local_subject_access_reviews_stay_in_their_namespace() {
    let h = Http::start_with(config()).await;
    let path = "/apis/authorization.k8s.io/v1/namespaces/prod/localsubjectaccessreviews";
    let review =
        |metadata: Value, spec: Value| json!({"metadata": metadata, "spec": spec}).to_string();
    let pods_in = |ns: &str| json!({"user": "bob", "groups": ["dev"], "resourceAttributes": {"namespace": ns, "verb": "get", "resource": "pods"}});

    let v = created(
        &h.as_user(
            TOKEN,
            "POST",
            path,
            &[],
            &review(json!({}), pods_in("prod")),
        )
        .await,
    );
    assert_eq!(v["kind"], "LocalSubjectAccessReview");
    assert_eq!(v["metadata"]["namespace"], "prod");
    assert_eq!(v["status"], json!({"allowed": false, "denied": true}));
    let v = created(
        &h.as_user(TOKEN, "POST", path, &[], &review(json!({"namespace": "prod"}), json!({"user": "bob", "resourceAttributes": {"namespace": "prod", "verb": "get", "resource": "pods"}})))
            .await,
    );
    assert_eq!(v["status"], json!({"allowed": true}));

    let cases: Vec<(String, u16, &str)> = vec![
        (
            review(json!({}), pods_in("default")),
            422,
            "spec.resourceAttributes.namespace: Invalid value: \"default\": must match metadata.namespace",
        ),
        (
            review(
                json!({}),
                json!({"user": "bob", "nonResourceAttributes": {"verb": "get", "path": "/x"}}),
            ),
            422,
            "spec.nonResourceAttributes: Invalid value: authorization.NonResourceAttributes{Path:\"/x\", Verb:\"get\"}: disallowed on this kind of request",
        ),
        (
            review(json!({"labels": {"a": "b"}}), pods_in("prod")),
            422,
            "must be empty except for namespace",
        ),
        (
            review(json!({"namespace": "other"}), pods_in("prod")),
            400,
            "the namespace of the provided object does not match the namespace sent on the request",
        ),
    ];
    for (body, code, message) in cases {
        let reply = h.as_user(TOKEN, "POST", path, &[], &body).await;
        assert_status(
            &reply,
            code,
            if code == 400 { "BadRequest" } else { "Invalid" },
            message,
        );
    }
    h.server.shutdown().await;
}

#[tokio::test]
async fn token_reviews_know_the_servers_tokens() {
    let h = Http::start_with(config()).await;
    let audience = super::super::reviews::API_AUDIENCE;
    let review = |token: &str, audiences: Value| {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": audiences}})
            .to_string()
    };
    let invalid = json!({"user": {}, "error": "invalid bearer token"});
    let cases: Vec<(String, Value)> = vec![
        (
            review(TOKEN, Value::Null),
            json!({"authenticated": true, "user": {"username": "system:admin", "groups": ["system:masters", "system:authenticated"]}, "audiences": [audience]}),
        ),
        (
            review(SA_TOKEN, json!([audience, "other"])),
            json!({"authenticated": true, "user": {"username": "system:serviceaccount:prod:web", "groups": ["system:serviceaccounts", "system:serviceaccounts:prod", "system:authenticated"]}, "audiences": [audience]}),
        ),
        (review(ALICE_TOKEN, json!(["other"])), invalid.clone()),
        (review("unknown", Value::Null), invalid.clone()),
    ];
    for (body, status) in cases {
        let reply = h.as_user(TOKEN, "POST", TOKEN_REVIEW, &[], &body).await;
        let v = created(&reply);
        assert_eq!(v["status"], status, "{body}");
        let sent: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["spec"]["token"], sent["spec"]["token"], "spec echoed");
    }
    assert_status(
        &h.as_user(TOKEN, "POST", TOKEN_REVIEW, &[], "{\"spec\":{}}")
            .await,
        400,
        "BadRequest",
        "token is required for TokenReview in authentication",
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn the_authorizer_can_change_while_serving() {
    let h = Http::start_with(ApiServerConfig::with_tokens([TOKEN])).await;
    let body = ssar_resource("delete", "", "pods", "default");
    let allowed = |v: Value| v["status"]["allowed"].clone();
    assert_eq!(
        allowed(created(&h.as_user(TOKEN, "POST", SSAR, &[], &body).await)),
        true
    );
    h.server
        .set_authorizer(Authorizer::allow_all().deny(Denial::user(
            "system:admin",
            "delete",
            DenialTarget::resource("pods"),
        )));
    assert_eq!(
        allowed(created(&h.as_user(TOKEN, "POST", SSAR, &[], &body).await)),
        false
    );
    h.server.set_authorizer(Authorizer::allow_all());
    assert_eq!(
        allowed(created(&h.as_user(TOKEN, "POST", SSAR, &[], &body).await)),
        true
    );
    h.server.shutdown().await;
}
