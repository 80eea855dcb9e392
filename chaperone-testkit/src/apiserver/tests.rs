//! HTTP-level tests: a real TLS client against a running server.

use http_body_util::BodyExt as _;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use serde_json::{Value, json};

use super::*;

mod custom;
mod reviews;
mod scale;

const TOKEN: &str = "tok";

#[test]
fn go_booleans() {
    let cases = [
        (None, false),
        (Some("false"), false),
        (Some("FALSE"), false),
        (Some("False"), false),
        (Some("0"), false),
        (Some("true"), true),
        (Some("True"), true),
        (Some("1"), true),
        (Some(""), true),
        (Some("yes"), true),
    ];
    for (value, want) in cases {
        assert_eq!(go_bool(value), want, "{value:?}");
    }
}

#[test]
fn content_negotiation() {
    let q = Query::parse(None);
    let table_v1 = Output::Table(TableOptions {
        meta_version: "meta.k8s.io/v1",
        include: IncludeObject::Metadata,
    });
    let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
    let cases: Vec<(Option<&str>, Result<Output, u16>)> = vec![
        (None, Ok(Output::Json)),
        (Some(""), Ok(Output::Json)),
        (Some(kubectl), Ok(table_v1)),
        (
            Some("application/json;as=Table;v=v1beta1;g=meta.k8s.io"),
            Ok(Output::Table(TableOptions {
                meta_version: "meta.k8s.io/v1beta1",
                include: IncludeObject::Metadata,
            })),
        ),
        (
            Some("application/json;as=Table;v=v2;g=meta.k8s.io,application/json"),
            Ok(Output::Json),
        ),
        (
            Some("application/json;as=Table;v=v2;g=meta.k8s.io"),
            Err(406),
        ),
        (
            Some("application/vnd.kubernetes.protobuf,application/json"),
            Ok(Output::Json),
        ),
        (Some("application/vnd.kubernetes.protobuf"), Err(406)),
        (Some("application/yaml"), Ok(Output::Yaml)),
        (Some("*/*"), Ok(Output::Json)),
        (Some("text/html"), Err(406)),
    ];
    for (accept, want) in cases {
        let got = negotiate(accept, &q, true).map_err(|s| s.code().as_u16());
        assert_eq!(got, want, "Accept: {accept:?}");
    }
    let object = Query::parse(Some("includeObject=Object"));
    assert_eq!(
        negotiate(Some(kubectl), &object, true),
        Ok(Output::Table(TableOptions {
            meta_version: "meta.k8s.io/v1",
            include: IncludeObject::Object
        }))
    );
    let bad = Query::parse(Some("includeObject=All"));
    assert_eq!(
        negotiate(Some(kubectl), &bad, true).map_err(|s| s.code().as_u16()),
        Err(400)
    );
}

/// path, then (resource, namespace, name, subresource, legacy watch) if served.
type PathCase = (
    &'static str,
    Option<(&'static str, &'static str, Option<&'static str>, Sub, bool)>,
);

#[test]
fn resource_paths() {
    let cases: Vec<PathCase> = vec![
        (
            "/api/v1/namespaces/d/pods",
            Some(("pods", "d", None, Sub::None, false)),
        ),
        ("/api/v1/pods", Some(("pods", "", None, Sub::None, false))),
        (
            "/api/v1/namespaces/d/pods/p",
            Some(("pods", "d", Some("p"), Sub::None, false)),
        ),
        (
            "/api/v1/namespaces/d/pods/p/status",
            Some(("pods", "d", Some("p"), Sub::Status, false)),
        ),
        (
            "/api/v1/watch/namespaces/d/pods/p",
            Some(("pods", "d", Some("p"), Sub::None, true)),
        ),
        (
            "/api/v1/namespaces/d",
            Some(("namespaces", "", Some("d"), Sub::None, false)),
        ),
        (
            "/api/v1/namespaces/d/status",
            Some(("namespaces", "", Some("d"), Sub::Status, false)),
        ),
        (
            "/api/v1/namespaces",
            Some(("namespaces", "", None, Sub::None, false)),
        ),
        (
            "/apis/apps/v1/namespaces/d/deployments",
            Some(("deployments", "d", None, Sub::None, false)),
        ),
        (
            "/apis/apps/v1/namespaces/d/deployments/web/scale",
            Some(("deployments", "d", Some("web"), Sub::Scale, false)),
        ),
        (
            "/apis/apps/v1/namespaces/d/statefulsets/db/scale",
            Some(("statefulsets", "d", Some("db"), Sub::Scale, false)),
        ),
        (
            "/apis/apps/v1/namespaces/d/replicasets/web-1/scale",
            Some(("replicasets", "d", Some("web-1"), Sub::Scale, false)),
        ),
        (
            "/apis/apps/v1/watch/namespaces/d/deployments/web/scale",
            None,
        ),
        ("/api/v1/namespaces/d/pods/p/scale", None),
        ("/api/v1/namespaces/d/pods/p/exec", None),
        ("/api/v1/namespaces/d/configmaps/c/status", None),
        ("/api/v1/pods/p", None),
        ("/api/v1/namespaces/d/widgets", None),
        ("/apis/batch/v1/namespaces/d/jobs", None),
        ("/api/v2/pods", None),
        ("/api/v1/namespaces/d/namespaces", None),
    ];
    for (path, want) in cases {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let got = parse_target(&discovery::Catalog::new(), &segs)
            .ok()
            .map(|t| {
                (
                    t.res.plural.to_owned(),
                    t.namespace.clone(),
                    t.name.clone(),
                    t.sub,
                    t.legacy_watch,
                )
            });
        let want =
            want.map(|(r, ns, n, s, w)| (r.to_owned(), ns.to_owned(), n.map(str::to_owned), s, w));
        assert_eq!(got, want, "{path}");
    }
}

struct Http {
    server: TestApiServer,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Http {
    async fn start() -> Http {
        Self::start_with(ApiServerConfig::with_tokens([TOKEN])).await
    }

    async fn start_with(config: ApiServerConfig) -> Http {
        let server = TestApiServer::start(config)
            .await
            .unwrap_or_else(|e| panic!("start: {e}"));
        let roots = tls::root_store_from_pem(&server.ca_pem(), "ca")
            .unwrap_or_else(|e| panic!("roots: {e}"));
        let mut config = tls::client_config(roots).unwrap_or_else(|e| panic!("client config: {e}"));
        config.alpn_protocols.clear();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        Http { server, client }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.server.url()))
            .header("authorization", format!("Bearer {TOKEN}"));
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap_or_else(|e| panic!("request: {e}"))
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let fut = async {
            let response = self
                .client
                .request(req)
                .await
                .unwrap_or_else(|e| panic!("send: {e}"));
            let (parts, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("body: {e}"))
                .to_bytes();
            Reply {
                status: parts.status,
                headers: parts.headers,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            }
        };
        tokio::time::timeout(Duration::from_secs(20), fut)
            .await
            .unwrap_or_else(|_| panic!("request timed out"))
    }

    async fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        self.send(self.request(method, path, headers, body)).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], "").await
    }
}

fn assert_status(reply: &Reply, code: u16, reason: &str, message_part: &str) {
    assert_eq!(reply.status.as_u16(), code, "{}", reply.body);
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
    let v = reply.json();
    assert_eq!(
        (v["kind"].as_str(), v["status"].as_str()),
        (Some("Status"), Some("Failure")),
        "{v}"
    );
    assert_eq!(
        (v["code"].as_u64(), v["reason"].as_str()),
        (Some(u64::from(code)), Some(reason)),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains(message_part)),
        "{message_part:?} not in {v}"
    );
}

fn lines(body: &str) -> Vec<Value> {
    assert!(
        body.is_empty() || body.ends_with('\n'),
        "events are newline-terminated: {body:?}"
    );
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l}: {e}")))
        .collect()
}

#[tokio::test]
async fn authentication_and_request_log() {
    let h = Http::start().await;
    let cases: Vec<(Option<&str>, u16)> = vec![
        (None, 401),
        (Some("Bearer wrong"), 401),
        (Some("Basic dG9rOg=="), 401),
        (Some("Bearer"), 401),
        (Some("Bearer tok"), 200),
        (Some("bearer tok"), 200),
        (Some("BEARER   tok  "), 200),
    ];
    for (auth, want) in cases {
        let mut req = h.request("GET", "/api/v1/namespaces", &[], "");
        req.headers_mut().remove("authorization");
        if let Some(a) = auth {
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(a).unwrap_or_else(|e| panic!("{e}")),
            );
        }
        let reply = h.send(req).await;
        assert_eq!(reply.status.as_u16(), want, "{auth:?}: {}", reply.body);
        if want == 401 {
            assert_status(&reply, 401, "Unauthorized", "Unauthorized");
        }
    }
    h.server.clear_requests();
    let req = h.request(
        "GET",
        "/api/v1/namespaces/default/pods?limit=1",
        &[
            ("impersonate-user", "alice"),
            ("impersonate-group", "a"),
            ("impersonate-group", "b"),
            ("impersonate-extra-scopes", "x"),
            ("user-agent", "test/1"),
        ],
        "",
    );
    h.send(req).await;
    let seen = h.server.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(
        seen[0].path_and_query,
        "/api/v1/namespaces/default/pods?limit=1"
    );
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer tok"));
    assert_eq!(seen[0].user_agent.as_deref(), Some("test/1"));
    assert_eq!(seen[0].http_version, "HTTP/2.0");
    let imp: Vec<(&str, &str)> = seen[0]
        .impersonation
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        imp,
        [
            ("impersonate-user", "alice"),
            ("impersonate-group", "a"),
            ("impersonate-group", "b"),
            ("impersonate-extra-scopes", "x")
        ]
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn discovery_and_non_resource_paths() {
    let h = Http::start().await;
    let agg =
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
    for (path, core) in [("/api", true), ("/apis", false)] {
        let reply = h.call("GET", path, &[("accept", agg)], "").await;
        assert_eq!(
            reply.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"[..])
        );
        assert_eq!(reply.json()["kind"], "APIGroupDiscoveryList");
        let legacy = h.get(path).await;
        assert_eq!(
            legacy.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        assert_eq!(
            legacy.json()["kind"],
            if core { "APIVersions" } else { "APIGroupList" }
        );
    }
    assert_eq!(
        h.get("/api").await.json()["serverAddressByClientCIDRs"][0]["serverAddress"],
        h.server.addr().to_string()
    );
    assert_eq!(h.get("/api/v1").await.json()["groupVersion"], "v1");
    assert_eq!(
        h.get("/apis/apps/v1").await.json()["groupVersion"],
        "apps/v1"
    );
    assert_eq!(
        h.get("/apis/apps").await.json()["preferredVersion"]["groupVersion"],
        "apps/v1"
    );
    assert_eq!(h.get("/version").await.json()["gitVersion"], "v1.32.0");
    for path in ["/healthz", "/readyz", "/livez", "/readyz?verbose"] {
        let r = h.get(path).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"), "{path}");
    }
    for path in [
        "/nope",
        "/apis/batch/v1",
        "/api/v1/widgets",
        "/openapi/v2",
        "/openapi/v3/apis/batch/v1",
        "/api/v1/namespaces/default/pods/p/ephemeralcontainers",
    ] {
        assert_status(
            &h.get(path).await,
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    assert_status(
        &h.call("POST", "/version", &[], "").await,
        405,
        "MethodNotAllowed",
        "",
    );
    h.server.shutdown().await;
}

/// method, path, headers, body, expected code, reason, message fragment.
type ErrorCase = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static str,
    u16,
    &'static str,
    &'static str,
);

#[tokio::test]
async fn crud_status_errors_and_delete_responses() {
    let h = Http::start().await;
    let json_ct = [("content-type", "application/json")];
    let cm = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"a":"b"}}"#;
    let created = h
        .call(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            &json_ct,
            cm,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let created = created.json();
    assert_eq!(created["metadata"]["namespace"], "default");

    let cases: Vec<ErrorCase> = vec![
        (
            "POST",
            "/api/v1/namespaces/default/configmaps",
            json_ct.to_vec(),
            cm,
            409,
            "AlreadyExists",
            "configmaps \"c\" already exists",
        ),
        (
            "POST",
            "/api/v1/namespaces/nope/configmaps",
            json_ct.to_vec(),
            cm,
            404,
            "NotFound",
            "namespaces \"nope\" not found",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/configmaps",
            json_ct.to_vec(),
            "{\"metadata\": ",
            400,
            "BadRequest",
            "json parse error: EOF while parsing",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/configmaps",
            json_ct.to_vec(),
            r#"{"kind":"Pod","metadata":{"name":"x"}}"#,
            400,
            "BadRequest",
            "the kind in the data (Pod) does not match the expected kind (ConfigMap)",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/configmaps",
            json_ct.to_vec(),
            r#"{"metadata":{"name":"x","namespace":"other"}}"#,
            400,
            "BadRequest",
            "does not match the namespace sent on the request",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/configmaps",
            vec![("content-type", "application/vnd.kubernetes.protobuf")],
            "k8s\0",
            415,
            "UnsupportedMediaType",
            "unknown format",
        ),
        (
            "POST",
            "/api/v1/configmaps",
            json_ct.to_vec(),
            cm,
            405,
            "MethodNotAllowed",
            "create is not supported",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/configmaps/missing",
            vec![],
            "",
            404,
            "NotFound",
            "configmaps \"missing\" not found",
        ),
        (
            "PUT",
            "/api/v1/namespaces/default/configmaps/c",
            json_ct.to_vec(),
            r#"{"metadata":{"name":"c","resourceVersion":"1"}}"#,
            409,
            "Conflict",
            "the object has been modified",
        ),
        (
            "PUT",
            "/api/v1/namespaces/default/configmaps/c",
            json_ct.to_vec(),
            r#"{"metadata":{"name":"d"}}"#,
            400,
            "BadRequest",
            "does not match the name on the URL",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c",
            vec![("content-type", "application/x-unknown")],
            "{}",
            415,
            "UnsupportedMediaType",
            "application/merge-patch+json",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c",
            vec![("content-type", "application/merge-patch+json")],
            "{nope",
            400,
            "BadRequest",
            "error decoding patch",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c",
            vec![("content-type", "application/apply-patch+yaml")],
            cm,
            422,
            "Invalid",
            "fieldManager: Required value",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c?force=true",
            vec![("content-type", "application/merge-patch+json")],
            "{}",
            422,
            "Invalid",
            "force: Forbidden",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c",
            vec![("content-type", "application/json-patch+json")],
            r#"[{"op":"test","path":"/data/a","value":"zzz"}]"#,
            422,
            "Invalid",
            "testing value /data/a failed",
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c",
            vec![("content-type", "application/merge-patch+json")],
            r#"{"metadata":{"resourceVersion":"3"}}"#,
            409,
            "Conflict",
            "the object has been modified",
        ),
        (
            "DELETE",
            "/api/v1/namespaces",
            vec![],
            "",
            405,
            "MethodNotAllowed",
            "deletecollection is not supported",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/configmaps?fieldSelector=data.a%3Db",
            vec![],
            "",
            400,
            "BadRequest",
            "field label not supported: data.a",
        ),
        (
            "GET",
            "/api/v1/namespaces/default/configmaps/c",
            vec![("accept", "application/vnd.kubernetes.protobuf")],
            "",
            406,
            "NotAcceptable",
            "only the following media types",
        ),
    ];
    for (method, path, headers, body, code, reason, message) in cases {
        let reply = h.call(method, path, &headers, body).await;
        assert_status(&reply, code, reason, message);
    }

    // Patch types.
    let merge = h
        .call(
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c",
            &[("content-type", "application/merge-patch+json")],
            r#"{"data":{"x":"y"}}"#,
        )
        .await;
    assert_eq!(merge.json()["data"], json!({"a": "b", "x": "y"}));
    let smp = h
        .call(
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c",
            &[(
                "content-type",
                "application/strategic-merge-patch+json; charset=utf-8",
            )],
            r#"{"data":{"x":null}}"#,
        )
        .await;
    assert_eq!(smp.json()["data"], json!({"a": "b"}));
    let jp = h
        .call(
            "PATCH",
            "/api/v1/namespaces/default/configmaps/c",
            &[("content-type", "application/json-patch+json")],
            r#"[{"op":"add","path":"/data/j","value":"k"}]"#,
        )
        .await;
    assert_eq!(jp.json()["data"], json!({"a": "b", "j": "k"}));
    let apply_body = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: new\ndata:\n  q: r\n";
    let applied = h
        .call(
            "PATCH",
            "/api/v1/namespaces/default/configmaps/new?fieldManager=test",
            &[("content-type", "application/apply-patch+yaml")],
            apply_body,
        )
        .await;
    assert_eq!(applied.status, StatusCode::CREATED, "{}", applied.body);
    let reapplied = h
        .call(
            "PATCH",
            "/api/v1/namespaces/default/configmaps/new?fieldManager=test",
            &[("content-type", "application/apply-patch+yaml")],
            apply_body,
        )
        .await;
    assert_eq!(reapplied.status, StatusCode::OK, "{}", reapplied.body);

    // Update with the current resourceVersion succeeds and bumps it.
    let current = h
        .get("/api/v1/namespaces/default/configmaps/c")
        .await
        .json();
    let mut next = current.clone();
    next["data"] = json!({"only": "this"});
    let put = h
        .call(
            "PUT",
            "/api/v1/namespaces/default/configmaps/c",
            &json_ct,
            &next.to_string(),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    assert_ne!(
        put.json()["metadata"]["resourceVersion"],
        current["metadata"]["resourceVersion"]
    );

    // Lists: kind, items without kind, resourceVersion; Table with includeObject.
    let list = h.get("/api/v1/namespaces/default/configmaps").await.json();
    assert_eq!(list["kind"], "ConfigMapList");
    assert!(list["metadata"]["resourceVersion"].is_string());
    assert!(
        list["items"]
            .as_array()
            .is_some_and(|i| i.len() == 2 && i.iter().all(|o| o.get("kind").is_none())),
        "{list}"
    );
    let empty = h
        .get("/api/v1/namespaces/kube-public/configmaps")
        .await
        .json();
    assert_eq!(empty["items"], json!([]));
    let table = h
        .call(
            "GET",
            "/api/v1/namespaces/default/configmaps?includeObject=None",
            &[("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")],
            "",
        )
        .await
        .json();
    assert_eq!(table["kind"], "Table");
    assert_eq!(table["rows"][0]["object"], Value::Null);

    // Delete: configmaps answer with a Success Status, pods with the object.
    let deleted = h
        .call("DELETE", "/api/v1/namespaces/default/configmaps/c", &[], "")
        .await
        .json();
    assert_eq!(
        (deleted["kind"].as_str(), deleted["status"].as_str()),
        (Some("Status"), Some("Success")),
        "{deleted}"
    );
    assert_eq!(deleted["details"]["name"], "c");
    assert_eq!(deleted["details"]["kind"], "configmaps");
    assert_eq!(deleted["details"]["uid"], created["metadata"]["uid"]);
    h.server
        .seed(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}))
        .unwrap_or_else(|e| panic!("{e}"));
    let pod = h
        .call("DELETE", "/api/v1/namespaces/default/pods/p", &[], "")
        .await
        .json();
    assert_eq!(
        (pod["kind"].as_str(), pod["metadata"]["name"].as_str()),
        (Some("Pod"), Some("p"))
    );
    let pre = h
        .call(
            "DELETE",
            "/api/v1/namespaces/default/configmaps/new",
            &json_ct,
            r#"{"preconditions":{"uid":"other"}}"#,
        )
        .await;
    assert_status(
        &pre,
        409,
        "Conflict",
        "Precondition failed: UID in precondition: other",
    );
    let collection = h
        .call("DELETE", "/api/v1/namespaces/default/configmaps", &[], "")
        .await
        .json();
    assert_eq!(collection["kind"], "ConfigMapList");
    assert_eq!(collection["items"].as_array().map(Vec::len), Some(1));
    h.server.shutdown().await;
}

/// `dryRun=All` on every mutating verb: the answer is what would be stored, and nothing is
/// (no object, no resourceVersion, no watch event), as the API server documents.
#[tokio::test]
async fn dry_run_answers_every_mutating_verb_and_stores_nothing() {
    let h = Http::start().await;
    let json_ct = [("content-type", "application/json")];
    let base = "/api/v1/namespaces/default/configmaps";
    let cm = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"a":"b"}}"#;
    let created = h.call("POST", base, &json_ct, cm).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let list_rv = |reply: &Reply| reply.json()["metadata"]["resourceVersion"].clone();
    let before = h.get(base).await;
    let stored = h.get(&format!("{base}/c")).await.json();

    let cases: [(&str, String, &str, &str, u16, &str); 7] = [
        (
            "POST",
            format!("{base}?dryRun=All"),
            "application/json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"d"},"data":{"a":"new"}}"#,
            201,
            "new",
        ),
        (
            "PUT",
            format!("{base}/c?dryRun=All"),
            "application/json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"a":"put"}}"#,
            200,
            "put",
        ),
        (
            "PATCH",
            format!("{base}/c?dryRun=All"),
            "application/merge-patch+json",
            r#"{"data":{"a":"merge"}}"#,
            200,
            "merge",
        ),
        (
            "PATCH",
            format!("{base}/c?dryRun=All"),
            "application/json-patch+json",
            r#"[{"op":"replace","path":"/data/a","value":"json"}]"#,
            200,
            "json",
        ),
        (
            "PATCH",
            format!("{base}/c?dryRun=All"),
            "application/strategic-merge-patch+json",
            r#"{"data":{"a":"strategic"}}"#,
            200,
            "strategic",
        ),
        (
            "PATCH",
            format!("{base}/c?dryRun=All&fieldManager=test&force=true"),
            "application/apply-patch+yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: applied\n",
            200,
            "applied",
        ),
        (
            "DELETE",
            format!("{base}/c?dryRun=All"),
            "application/json",
            "",
            200,
            // A ConfigMap's delete answers a Status (only some resources, pods among
            // them, answer the deleted object).
            "Success",
        ),
    ];
    for (method, path, content_type, body, code, want) in cases {
        let reply = h
            .call(method, &path, &[("content-type", content_type)], body)
            .await;
        assert_eq!(
            reply.status.as_u16(),
            code,
            "{method} {path}: {}",
            reply.body
        );
        let answered = reply.json();
        let got = if method == "DELETE" {
            &answered["status"]
        } else {
            &answered["data"]["a"]
        };
        assert_eq!(got, want, "{method} {path}: {answered}");
        assert_eq!(
            h.get(&format!("{base}/c")).await.json(),
            stored,
            "{method} {path} changed the stored object"
        );
    }
    let collection = h
        .call("DELETE", &format!("{base}?dryRun=All"), &[], "")
        .await;
    assert_eq!(collection.status, StatusCode::OK, "{}", collection.body);
    assert_eq!(h.get(&format!("{base}/c")).await.json(), stored);
    assert_eq!(
        h.get(&format!("{base}/d")).await.status,
        StatusCode::NOT_FOUND
    );
    let after = h.get(base).await;
    assert_eq!(
        list_rv(&after),
        list_rv(&before),
        "a dry run moved the resourceVersion"
    );
    assert_eq!(after.json()["items"], before.json()["items"]);

    // No watch event for any of them: a watch from the list's version sees only what
    // happens next (a real change), never the dry runs.
    let rv = list_rv(&before);
    let rv = rv.as_str().expect("list resourceVersion");
    let real = h
        .call(
            "PATCH",
            &format!("{base}/c"),
            &[("content-type", "application/merge-patch+json")],
            r#"{"data":{"a":"real"}}"#,
        )
        .await;
    assert_eq!(real.status, StatusCode::OK, "{}", real.body);
    let events = h
        .get(&format!(
            "{base}?watch=true&resourceVersion={rv}&timeoutSeconds=1"
        ))
        .await;
    let events = lines(&events.body);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["object"]["data"]["a"], "real", "{events:?}");

    let bad = h
        .call("POST", &format!("{base}?dryRun=Yes"), &json_ct, cm)
        .await;
    assert_status(&bad, 422, "Invalid", "dryRun: Unsupported value: \"Yes\"");
}

#[tokio::test]
async fn watch_semantics() {
    let h = Http::start().await;
    let seed_cm = |name: &str| {
        h.server
            .seed(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}}))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let a = seed_cm("a");
    let rv_a = a["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    seed_cm("b");

    // RV unset: synthetic ADDED for existing objects; timeoutSeconds ends the stream.
    let body = h
        .get("/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1")
        .await
        .body;
    let events = lines(&body);
    let names: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or(""),
                e["object"]["metadata"]["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(names, [("ADDED", "a"), ("ADDED", "b")]);
    assert_eq!(
        events[0]["object"]["kind"], "ConfigMap",
        "watch objects carry their kind"
    );

    // RV=X: only changes after X. Legacy path with a name: only that object.
    let after = lines(&h.get(&format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv_a}&timeoutSeconds=1")).await.body);
    assert_eq!(
        after
            .iter()
            .map(|e| e["object"]["metadata"]["name"].clone())
            .collect::<Vec<_>>(),
        [json!("b")]
    );
    let single = lines(
        &h.get("/api/v1/watch/namespaces/default/configmaps/a?timeoutSeconds=1")
            .await
            .body,
    );
    assert_eq!(single.len(), 1);
    assert_eq!(single[0]["object"]["metadata"]["name"], "a");
    let mismatch = h
        .get("/api/v1/watch/namespaces/default/configmaps/a?fieldSelector=metadata.name%3Db")
        .await;
    assert_status(
        &mismatch,
        400,
        "BadRequest",
        "does not match the name on the URL",
    );

    // watch=false is a list.
    assert_eq!(
        h.get("/api/v1/namespaces/default/configmaps?watch=false")
            .await
            .json()["kind"],
        "ConfigMapList"
    );

    // Too old: 200, then exactly one ERROR 410 Expired event.
    let expired = h
        .get("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=5")
        .await;
    assert_eq!(expired.status, StatusCode::OK);
    let events = lines(&expired.body);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (
            events[0]["type"].as_str(),
            events[0]["object"]["reason"].as_str(),
            events[0]["object"]["code"].as_u64()
        ),
        (Some("ERROR"), Some("Expired"), Some(410))
    );

    // Table watch: one-row tables, column definitions only on the first.
    let tables = lines(
        &h.call(
            "GET",
            "/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=1",
            &[("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")],
            "",
        )
        .await
        .body,
    );
    assert_eq!(tables.len(), 2);
    assert_eq!(tables[0]["object"]["kind"], "Table");
    assert_eq!(
        tables[0]["object"]["rows"].as_array().map(Vec::len),
        Some(1)
    );
    assert!(
        tables[0]["object"]["columnDefinitions"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    );
    assert_eq!(tables[1]["object"]["columnDefinitions"], json!([]));

    // sendInitialEvents: initial ADDED then the initial-events-end bookmark.
    let initial = lines(
        &h.get("/api/v1/namespaces/default/configmaps?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1")
            .await
            .body,
    );
    assert_eq!(initial.len(), 3);
    assert_eq!(initial[2]["type"], "BOOKMARK");
    assert_eq!(
        initial[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );

    // Live events on a stream, and shutdown ends it.
    let watch_req = h.request("GET", "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0&labelSelector=live%3Dyes", &[], "");
    let response = h
        .client
        .request(watch_req)
        .await
        .unwrap_or_else(|e| panic!("watch: {e}"));
    let mut body = response.into_body();
    h.server
        .seed(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "live", "namespace": "default", "labels": {"live": "yes"}}}))
        .unwrap_or_else(|e| panic!("{e}"));
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap_or_else(|_| panic!("no live event"))
        .and_then(Result::ok)
        .and_then(|f| f.into_data().ok())
        .unwrap_or_else(|| panic!("no data frame"));
    let event: Value = serde_json::from_slice(&frame).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (
            event["type"].as_str(),
            event["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("live"))
    );
    let shutdown = tokio::spawn(h.server.shutdown());
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect()).await;
    assert!(
        rest.is_ok(),
        "the watch stream must end when the server shuts down"
    );
    tokio::time::timeout(Duration::from_secs(15), shutdown)
        .await
        .unwrap_or_else(|_| panic!("shutdown hung"))
        .unwrap_or_else(|e| panic!("shutdown task: {e}"));
}

#[tokio::test]
async fn http1_clients_are_served() {
    let server = TestApiServer::start(ApiServerConfig::default())
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    let roots = tls::root_store_from_pem(&server.ca_pem(), "ca").unwrap_or_else(|e| panic!("{e}"));
    let mut config = tls::client_config(roots).unwrap_or_else(|e| panic!("{e}"));
    config.alpn_protocols.clear();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let uri = format!(
        "https://localhost:{}/api/v1/namespaces/default",
        server.addr().port()
    );
    let response = client
        .get(uri.parse().unwrap_or_else(|e| panic!("{e}")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "no tokens configured: authentication is off"
    );
    assert_eq!(server.requests()[0].http_version, "HTTP/1.1");
    server.shutdown().await;
}

#[tokio::test]
async fn stream_subresources_refuse_what_a_kubelet_would() {
    let h = Http::start().await;
    for (name, phase) in [
        ("running", "Running"),
        ("done", "Succeeded"),
        ("new", "Pending"),
    ] {
        h.server
            .seed(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"containers": [{"name": "main", "image": "x"}]},
                "status": {"phase": phase}
            }))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let ws = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
        ("sec-websocket-protocol", "v5.channel.k8s.io"),
    ];
    let base = "/api/v1/namespaces/default/pods";
    // (method, path under the pods collection, headers, code, reason, message part)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        u16,
        &'a str,
        &'a str,
    );
    let cases: [Case<'_>; 7] = [
        (
            "GET",
            "missing/exec?command=ls",
            &ws,
            404,
            "NotFound",
            "pods \"missing\" not found",
        ),
        (
            "GET",
            "running/exec?command=ls",
            &[],
            400,
            "BadRequest",
            "Upgrade request required",
        ),
        (
            "GET",
            "running/exec",
            &ws,
            400,
            "BadRequest",
            "at least 1 command",
        ),
        (
            "GET",
            "running/exec?command=ls&container=other",
            &ws,
            400,
            "BadRequest",
            "container other is not valid for pod running",
        ),
        (
            "GET",
            "done/exec?command=ls",
            &ws,
            400,
            "BadRequest",
            "cannot exec into a container in a completed pod; current phase is Succeeded",
        ),
        (
            "GET",
            "new/portforward",
            &ws,
            400,
            "BadRequest",
            "pod new is not running",
        ),
        (
            "DELETE",
            "running/exec?command=ls",
            &ws,
            405,
            "MethodNotAllowed",
            "does not allow this method",
        ),
    ];
    for (method, path, headers, code, reason, message) in cases {
        let reply = h.call(method, &format!("{base}/{path}"), headers, "").await;
        assert_status(&reply, code, reason, message);
    }
    let log = h.get(&format!("{base}/running/log")).await;
    assert_eq!((log.status.as_u16(), log.body.as_str()), (200, ""));
    h.server.append_pod_log("default", "running", "a line\n");
    let log = h.get(&format!("{base}/running/log?container=main")).await;
    assert_eq!(
        (
            log.status.as_u16(),
            log.headers.get("content-type").map(|v| v.as_bytes()),
            log.body.as_str()
        ),
        (200, Some(&b"text/plain"[..]), "a line\n")
    );
}

#[tokio::test]
async fn large_responses_are_gzipped_like_the_api_servers_compression_filter() {
    use std::io::Read as _;
    let big = json!({"kind": "ConfigMapList", "items": [{"data": {"k": "v".repeat(200 * 1024)}}]});
    let response = gzip_large(json_response(StatusCode::OK, &big)).await;
    assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let gz = response.into_body().collect().await.unwrap().to_bytes();
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&plain).unwrap(), big);
    // Under the threshold: as it is.
    let small = json!({"kind": "ConfigMapList", "items": []});
    let response = gzip_large(json_response(StatusCode::OK, &small)).await;
    assert!(response.headers().get(header::CONTENT_ENCODING).is_none());
    let mut h = HeaderMap::new();
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("deflate, gzip;q=1.0"),
    );
    assert!(accepts_gzip(&h));
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    assert!(!accepts_gzip(&h));
}
