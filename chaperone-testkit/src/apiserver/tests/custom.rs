//! Custom resources over HTTP: registering a CustomResourceDefinition (Chaperone's own
//! `accessrequests.chaperone.dev`), discovery listing it, namespaced custom objects with
//! the status subresource, and watching them.

use super::*;

const JSON: (&str, &str) = ("content-type", "application/json");
const ARS: &str = "/apis/chaperone.dev/v1alpha1/namespaces/default/accessrequests";

fn definition() -> Value {
    let yaml = gateway_userspace::approval::resource::crd_yaml()
        .unwrap_or_else(|e| panic!("crd yaml: {e}"));
    serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("crd yaml: {e}"))
}

fn access_request(name: &str) -> Value {
    json!({
        "apiVersion": "chaperone.dev/v1alpha1",
        "kind": "AccessRequest",
        "metadata": {"name": name, "labels": {"chaperone.dev/fingerprint": "f00d"}},
        "spec": {
            "requester": {"workload": {"namespace": "agents", "pod": "agent-0"}},
            "request": {"verb": "patch", "resource": "apps/deployments", "path": "/apis/apps/v1/namespaces/prod/deployments/web", "summary": "scale web to 0"},
            "fingerprint": "f00d", "rule": "scale-prod", "approvers": {"groups": ["sre"]},
            "grant": {}, "node": "node-a",
            "createdAt": "2026-12-03T20:00:00Z", "expiresAt": "2026-12-03T20:05:00Z",
        },
        "status": {"phase": "Approved", "decidedBy": "mallory"},
    })
}

async fn register(h: &Http) -> Value {
    let created = h
        .call(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            &[JSON],
            &definition().to_string(),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    created.json()
}

#[tokio::test]
async fn a_registered_definition_is_discovered_and_served() {
    let h = Http::start().await;
    // Unknown before registration, like any unserved group.
    assert_status(&h.get(ARS).await, 404, "NotFound", "could not find");

    let crd = register(&h).await;
    let established = crd["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Established"))
        .map(|c| c["status"].clone());
    assert_eq!(established, Some(json!("True")), "{crd}");
    let listed = h
        .get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        .await
        .json();
    assert_eq!(
        listed["items"][0]["metadata"]["name"],
        "accessrequests.chaperone.dev"
    );

    let groups = h.get("/apis").await.json();
    let group = groups["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["name"] == "chaperone.dev"))
        .cloned()
        .unwrap_or_else(|| panic!("chaperone.dev missing from {groups}"));
    assert_eq!(
        group["preferredVersion"]["groupVersion"],
        "chaperone.dev/v1alpha1"
    );
    let doc = h.get("/apis/chaperone.dev").await.json();
    assert_eq!(doc["kind"], "APIGroup");
    let resources = h.get("/apis/chaperone.dev/v1alpha1").await.json();
    let names: Vec<&str> = resources["resources"]
        .as_array()
        .map(|rs| rs.iter().filter_map(|r| r["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["accessrequests", "accessrequests/status"]);
    assert_eq!(resources["resources"][0]["shortNames"], json!(["ar"]));
    assert_eq!(resources["resources"][0]["namespaced"], true);
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
    let item = aggregated["items"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find(|i| i["metadata"]["name"] == "chaperone.dev")
        })
        .cloned()
        .unwrap_or_else(|| panic!("chaperone.dev missing from {aggregated}"));
    assert_eq!(item["versions"][0]["version"], "v1alpha1");
    assert_eq!(
        item["versions"][0]["resources"][0]["subresources"][0]["subresource"],
        "status"
    );

    // Registering it again (a second gateway, `kubectl apply`) is a conflict, not a reset.
    let again = h
        .call(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            &[JSON],
            &definition().to_string(),
        )
        .await;
    assert_status(&again, 409, "AlreadyExists", "already exists");
}

#[tokio::test]
async fn custom_objects_keep_status_apart_and_can_be_watched() {
    let h = Http::start().await;
    register(&h).await;
    let start_rv = h.server.resource_version();

    // Create: the status subresource exists, so a create cannot set the status.
    let created = h
        .call("POST", ARS, &[JSON], &access_request("ar-1").to_string())
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let created = created.json();
    assert!(created.get("status").is_none(), "{created}");
    assert_eq!(created["metadata"]["generation"], 1);
    assert!(
        created["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );
    assert_eq!(created["metadata"]["namespace"], "default");
    let uid = created["metadata"]["uid"].clone();

    // The main resource ignores status; a spec change bumps the generation.
    let mut put = created.clone();
    put["spec"]["node"] = json!("node-b");
    put["status"] = json!({"phase": "Approved"});
    let updated = h
        .call("PUT", &format!("{ARS}/ar-1"), &[JSON], &put.to_string())
        .await
        .json();
    assert_eq!(updated["spec"]["node"], "node-b");
    assert!(updated.get("status").is_none(), "{updated}");
    assert_eq!(updated["metadata"]["generation"], 2);
    assert_eq!(updated["metadata"]["uid"], uid);

    // The status subresource changes only the status, and not the generation.
    let patched = h
        .call(
            "PATCH",
            &format!("{ARS}/ar-1/status"),
            &[("content-type", "application/merge-patch+json")],
            r#"{"spec": {"node": "node-c"}, "status": {"phase": "Denied", "decidedBy": "alice"}}"#,
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    let patched = patched.json();
    assert_eq!(patched["spec"]["node"], "node-b");
    assert_eq!(patched["status"]["phase"], "Denied");
    assert_eq!(patched["metadata"]["generation"], 2);
    let rv_after_status = patched["metadata"]["resourceVersion"].clone();

    // PUT to /status with a stale resourceVersion conflicts.
    let mut stale = patched.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    let conflict = h
        .call(
            "PUT",
            &format!("{ARS}/ar-1/status"),
            &[JSON],
            &stale.to_string(),
        )
        .await;
    assert_status(&conflict, 409, "Conflict", "modified");

    // Custom resources have no strategic merge.
    let strategic = h
        .call(
            "PATCH",
            &format!("{ARS}/ar-1"),
            &[("content-type", "application/strategic-merge-patch+json")],
            "{}",
        )
        .await;
    assert_status(&strategic, 415, "UnsupportedMediaType", "merge-patch+json");

    // Get, list with a label selector, and a Table with the printer columns.
    let got = h.get(&format!("{ARS}/ar-1")).await.json();
    assert_eq!(got["metadata"]["resourceVersion"], rv_after_status);
    let list = h
        .get(&format!(
            "{ARS}?labelSelector=chaperone.dev%2Ffingerprint%3Df00d"
        ))
        .await
        .json();
    assert_eq!(list["kind"], "AccessRequestList");
    assert_eq!(list["apiVersion"], "chaperone.dev/v1alpha1");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    let none = h
        .get(&format!(
            "{ARS}?labelSelector=chaperone.dev%2Ffingerprint%3Dbeef"
        ))
        .await
        .json();
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0));
    let table = h
        .call(
            "GET",
            ARS,
            &[("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")],
            "",
        )
        .await
        .json();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(columns, ["Name", "Phase", "Workload", "Summary", "Expires"]);
    assert_eq!(
        table["rows"][0]["cells"]
            .as_array()
            .map(|c| c[..4].to_vec()),
        Some(vec![
            json!("ar-1"),
            json!("Denied"),
            json!("agent-0"),
            json!("scale web to 0")
        ])
    );

    // Delete answers with a Success Status, as for every custom resource.
    let deleted = h
        .call("DELETE", &format!("{ARS}/ar-1"), &[], "")
        .await
        .json();
    assert_eq!(deleted["status"], "Success");
    assert_eq!(deleted["details"]["group"], "chaperone.dev");

    // A watch from before the create replays every change, objects typed.
    let body = h
        .get(&format!(
            "{ARS}?watch=1&resourceVersion={start_rv}&timeoutSeconds=1"
        ))
        .await
        .body;
    let events = lines(&body);
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or(""),
                e["object"]["status"]["phase"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("ADDED", "-"),
            ("MODIFIED", "-"),
            ("MODIFIED", "Denied"),
            ("DELETED", "Denied")
        ]
    );
    assert_eq!(events[0]["object"]["kind"], "AccessRequest");
}

#[tokio::test]
async fn invalid_definitions_are_refused_and_deleted_ones_stop_being_served() {
    let h = Http::start().await;
    let mut bad = definition();
    bad["spec"]["scope"] = json!("Galaxy");
    let refused = h
        .call(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            &[JSON],
            &bad.to_string(),
        )
        .await;
    assert_status(&refused, 422, "Invalid", "spec.scope");
    assert_status(&h.get(ARS).await, 404, "NotFound", "could not find");

    register(&h).await;
    assert_eq!(h.get(ARS).await.status, StatusCode::OK);
    let deleted = h
        .call(
            "DELETE",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/accessrequests.chaperone.dev",
            &[],
            "",
        )
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.body);
    assert_status(&h.get(ARS).await, 404, "NotFound", "could not find");
    let groups = h.get("/apis").await.json();
    assert!(
        !groups.to_string().contains("chaperone.dev"),
        "still discovered: {groups}"
    );

    // Seeding a definition registers it too (the stack and the demo do that).
    h.server
        .seed(definition())
        .unwrap_or_else(|e| panic!("seed: {e}"));
    assert_eq!(h.get(ARS).await.status, StatusCode::OK);
}
