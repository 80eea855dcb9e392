//! The pod watch against the API test server: a watch that fails is reported as failing
//! (so a pod the store does not know is not decided as an unknown workload) until it has
//! listed this node's pods again, and what happened meanwhile is caught up.

use std::time::Duration;

use chaperone_testkit::{
    apiserver::{ApiServerConfig, TestApiServer},
    local::upstream_for,
};
use gateway_userspace::{
    identity::pods::{KubePodSource, PodSource as _, PodStore},
    status::Status,
};
use serde_json::json;

const TOKEN: &str = "gateway-token";

fn pod(name: &str, uid: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "agents", "uid": uid},
        "spec": {"nodeName": "node-a", "serviceAccountName": "agent", "containers": [{"name": "c"}]},
    })
}

async fn until(what: &str, check: impl Fn() -> bool) {
    for _ in 0..400 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never: {what}");
}

#[tokio::test]
async fn a_failing_pod_watch_is_reported_until_it_has_listed_again() {
    let apiserver = TestApiServer::start(ApiServerConfig::with_tokens([TOKEN]))
        .await
        .expect("API test server");
    apiserver
        .seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "agents"}}))
        .expect("namespace");
    apiserver
        .seed(pod("agent-0", "00000000-0000-0000-0000-000000000001"))
        .expect("pod");
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = upstream_for(&apiserver, dir.path(), TOKEN).expect("upstream");
    let client = kube::Client::try_from(upstream.config).expect("client");
    let errors = prometheus_client::metrics::counter::Counter::default();
    let store = PodStore::new();
    let source = KubePodSource::new(client, "node-a")
        .counting_errors_in(errors.clone())
        .with_watch_timeout(1);
    let task = tokio::spawn(source.run(store.clone()));
    until("listed", || {
        store.is_synced()
            && store
                .by_uid("00000000-0000-0000-0000-000000000001")
                .is_some()
    })
    .await;
    assert_eq!(store.watch_error(), None);

    // The API server fails the watch when it is opened again (its time is up every
    // second), and the lists after it.
    let is_pods = |r: &chaperone_testkit::apiserver::SeenRequest| {
        r.method == "GET" && r.path_and_query.starts_with("/api/v1/pods")
    };
    let fail = |times: usize| {
        for _ in 0..times {
            apiserver.refuse_on(
                is_pods,
                Status::failure(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "etcdserver: request timed out",
                ),
            );
        }
    };
    fail(3);
    until("the failure reported", || store.watch_error().is_some()).await;
    let error = store.watch_error().unwrap_or_default();
    assert!(error.contains("etcdserver: request timed out"), "{error}");
    // Nothing changes on the node, so no event says the watch is back: its new list does.
    until("current again without an event", || {
        store.watch_error().is_none()
    })
    .await;
    assert!(errors.get() >= 3, "{} errors counted", errors.get());

    // A pod created while the watch fails is known once it is current again.
    fail(2);
    until("failing again", || store.watch_error().is_some()).await;
    apiserver
        .seed(pod("agent-1", "00000000-0000-0000-0000-000000000002"))
        .expect("pod");
    until("current again", || store.watch_error().is_none()).await;
    assert!(
        store
            .by_uid("00000000-0000-0000-0000-000000000002")
            .is_some(),
        "current before the pod created meanwhile was listed"
    );
    task.abort();
}
