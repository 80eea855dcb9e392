//! The approval holder against the API test server: AccessRequests created with the
//! gateway's credential, released only by sealed decisions seen through the watch, expired
//! (and sealed) on timeout, reused by identical requests and after a restart, grants,
//! async mode, the per-workload cap, and failing closed when the API refuses.

use std::{sync::Arc, time::Duration};

use chaperone_testkit::{
    apiserver::{ApiServerConfig, TestApiServer},
    local::upstream_for,
};
use gateway_userspace::{
    approval::{
        holder::{
            DEFAULT_DECISION_POLL, DEFAULT_MAX_WAITING_PER_WORKLOAD, HoldOutcome, HoldRequest,
            Holder, HolderConfig,
        },
        resource::{
            AccessRequest, AccessRequestStatus, Approvers, GrantScope, Phase, RequestedAction,
            WorkloadRef, crd_yaml,
        },
        seal::SealKey,
        used::UsedLog,
    },
    policy::{Approval, ApprovalMode, GrantSpec},
};
use kube::{Api, api::PostParams};

const TOKEN: &str = "gateway-token";
const NS: &str = "chaperone-system";

struct Env {
    apiserver: TestApiServer,
    client: kube::Client,
    key: SealKey,
    _dir: tempfile::TempDir,
}

async fn env(with_crd: bool) -> Env {
    let apiserver = TestApiServer::start(ApiServerConfig::with_tokens([TOKEN]))
        .await
        .expect("API test server");
    if with_crd {
        let crd: serde_json::Value =
            serde_norway::from_str(&crd_yaml().expect("crd")).expect("crd yaml");
        apiserver.seed(crd).expect("register the CRD");
        apiserver
            .seed(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
            .expect("namespace");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = upstream_for(&apiserver, dir.path(), TOKEN).expect("upstream");
    let client = kube::Client::try_from(upstream.config).expect("client");
    Env {
        apiserver,
        client,
        key: SealKey::new(vec![7; 32]).expect("key"),
        _dir: dir,
    }
}

impl Env {
    fn holder(&self, node: &str, max_pending: usize) -> Arc<Holder> {
        self.holder_recording_in(node, max_pending, None)
    }

    /// A holder holding at most `max_waiting` requests of one workload at once.
    fn holder_waiting(&self, node: &str, max_waiting: usize) -> Arc<Holder> {
        self.holder_with(HolderConfig {
            max_waiting_per_workload: max_waiting,
            ..self.config(node, 10, None)
        })
    }

    /// A holder that records the `once` approvals it uses in `used`.
    fn holder_recording_in(
        &self,
        node: &str,
        max_pending: usize,
        used: Option<Arc<UsedLog>>,
    ) -> Arc<Holder> {
        self.holder_with(self.config(node, max_pending, used))
    }

    fn config(&self, node: &str, max_pending: usize, used: Option<Arc<UsedLog>>) -> HolderConfig {
        HolderConfig {
            namespace: NS.into(),
            node: node.into(),
            seal_key: self.key.clone(),
            max_pending_per_workload: max_pending,
            max_waiting_per_workload: DEFAULT_MAX_WAITING_PER_WORKLOAD,
            decision_poll: DEFAULT_DECISION_POLL,
            used,
        }
    }

    fn holder_with(&self, config: HolderConfig) -> Arc<Holder> {
        let holder = Holder::new(self.client.clone(), config);
        tokio::spawn(holder.clone().run_watcher());
        holder
    }

    fn api(&self) -> Api<AccessRequest> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Waits until exactly one AccessRequest exists, returning its name.
    async fn only_access_request(&self) -> String {
        self.access_requests(1).await[0]
            .metadata
            .name
            .clone()
            .expect("name")
    }

    /// Waits until exactly `n` AccessRequests exist, returning them.
    async fn access_requests(&self, n: usize) -> Vec<AccessRequest> {
        for _ in 0..200 {
            let list = self.api().list(&Default::default()).await.expect("list");
            if list.items.len() == n {
                return list.items;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("never saw {n} AccessRequests");
    }

    /// Writes a decision as the approvals API does: sealed with the shared key (or, with
    /// `sealed == false`, as someone editing the status directly).
    async fn decide(
        &self,
        name: &str,
        phase: Phase,
        by: &str,
        comment: Option<&str>,
        grant_until: Option<String>,
        sealed: bool,
    ) {
        let mut ar = self.api().get(name).await.expect("get");
        let mut status = AccessRequestStatus {
            phase,
            decided_by: Some(by.into()),
            decided_at: Some(jiff::Timestamp::now().to_string()),
            comment: comment.map(str::to_owned),
            grant_until,
            ..Default::default()
        };
        if sealed {
            status.seal = Some(self.key.seal(&ar, &status).expect("seal"));
        }
        ar.status = Some(status);
        self.api()
            .replace_status(name, &PostParams::default(), &ar)
            .await
            .expect("write status");
    }
}

fn approval(timeout: Duration, grant: GrantSpec, mode: ApprovalMode) -> Approval {
    Approval {
        approvers: Approvers {
            groups: vec!["sre".into()],
            users: vec![],
        },
        timeout,
        grant,
        mode,
    }
}

fn request<'a>(approval: &'a Approval, pod: &str, body: &'a [u8]) -> HoldRequest<'a> {
    HoldRequest {
        rule: "scale-prod",
        approval,
        workload: WorkloadRef {
            namespace: "agents".into(),
            pod: pod.into(),
            service_account: Some("agent".into()),
            uid: None,
        },
        principal: Some("system:serviceaccount:agents:agent".into()),
        method: "PATCH",
        target: "/apis/apps/v1/namespaces/prod/deployments/web/scale",
        action: RequestedAction {
            verb: "patch".into(),
            resource: "apps/deployments".into(),
            subresource: Some("scale".into()),
            namespace: Some("prod".into()),
            name: Some("web".into()),
            path: "/apis/apps/v1/namespaces/prod/deployments/web/scale".into(),
            summary: "patch deployments/scale prod/web, replicas=0".into(),
        },
        content_type: "application/merge-patch+json",
        body,
    }
}

const LONG: Duration = Duration::from_secs(60);

/// Holds `agent-0`'s request under `a` in the background.
fn hold_in_background(holder: &Arc<Holder>, a: &Approval) -> tokio::task::JoinHandle<HoldOutcome> {
    let (holder, a) = (holder.clone(), a.clone());
    tokio::spawn(async move { holder.hold(&request(&a, "agent-0", b"{}")).await })
}

#[tokio::test]
async fn held_until_a_sealed_approval_then_released() {
    let e = env(true).await;
    let holder = e.holder("node-a", 10);
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Hold);
    let held = hold_in_background(&holder, &a);
    let ars = e.access_requests(1).await;
    let ar = &ars[0];
    let name = ar.metadata.name.clone().expect("name");
    assert_eq!(ar.spec.requester.workload.pod, "agent-0");
    assert_eq!(ar.spec.node, "node-a");
    assert_eq!(
        ar.spec.request.summary,
        "patch deployments/scale prod/web, replicas=0"
    );
    assert!(ar.status.is_none(), "created pending");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!held.is_finished(), "released without a decision");

    e.decide(&name, Phase::Approved, "alice", None, None, true)
        .await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("released in time")
        .expect("task");
    match outcome {
        HoldOutcome::Approved {
            name: n,
            decided_by,
            via_grant,
            ..
        } => {
            assert_eq!(
                (n, decided_by.as_deref(), via_grant),
                (name, Some("alice"), false)
            );
        }
        other => panic!("expected approval, got {other:?}"),
    }
    assert_eq!(holder.tampering_attempts(), 0);
}

#[tokio::test]
async fn denial_carries_the_comment_and_an_unsealed_approval_is_ignored() {
    let e = env(true).await;
    let holder = e.holder("node-a", 10);
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Hold);
    let held = hold_in_background(&holder, &a);
    let name = e.only_access_request().await;
    // Approved directly at the API server, without the seal: ignored, counted.
    e.decide(&name, Phase::Approved, "mallory", None, None, false)
        .await;
    for _ in 0..100 {
        if holder.tampering_attempts() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(holder.tampering_attempts() >= 1, "tampering not noticed");
    assert!(
        !held.is_finished(),
        "an unsealed approval released the request"
    );

    e.decide(
        &name,
        Phase::Denied,
        "bob",
        Some("not during the freeze"),
        None,
        true,
    )
    .await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("released in time")
        .expect("task");
    assert!(
        matches!(&outcome, HoldOutcome::Denied { decided_by: Some(b), comment: Some(c), .. } if b == "bob" && c == "not during the freeze"),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn silence_expires_and_the_expiry_is_sealed() {
    let e = env(true).await;
    let holder = e.holder("node-a", 10);
    let a = approval(Duration::from_secs(1), GrantSpec::Once, ApprovalMode::Hold);
    let outcome = holder.hold(&request(&a, "agent-0", b"{}")).await;
    let HoldOutcome::Expired { name, waited } = outcome else {
        panic!("expected expiry, got {outcome:?}");
    };
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    let ar = e.api().get(&name).await.expect("get");
    let status = ar.status.clone().expect("status written");
    assert_eq!(status.phase, Phase::Expired);
    assert_eq!(status.decided_by.as_deref(), Some("chaperone"));
    assert_eq!(e.key.verify(&ar, &status), Ok(()), "expiry sealed");
}

#[tokio::test]
async fn async_mode_queues_then_a_retry_passes_once_approved() {
    let e = env(true).await;
    let holder = e.holder("node-a", 10);
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Async);
    let first = holder.hold(&request(&a, "agent-0", b"{}")).await;
    let HoldOutcome::Queued { name } = first else {
        panic!("expected queued, got {first:?}");
    };
    // A retry before the decision reuses the AccessRequest.
    let again = holder.hold(&request(&a, "agent-0", b"{}")).await;
    assert_eq!(again, HoldOutcome::Queued { name: name.clone() });
    assert_eq!(e.access_requests(1).await.len(), 1);
    e.decide(&name, Phase::Approved, "alice", None, None, true)
        .await;
    let retry = holder.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&retry, HoldOutcome::Approved { name: n, .. } if *n == name),
        "{retry:?}"
    );
    // `once`: the next identical request asks again.
    let next = holder.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&next, HoldOutcome::Queued { name: n } if *n != name),
        "{next:?}"
    );
}

/// An approval is for the principal it was shown with and the rule that asked for it: the
/// same request sent with another principal's token (the API server would see that
/// principal under principal impersonation), or held by another rule after a policy
/// reload, neither reuses the request nor passes on its approval.
#[tokio::test]
async fn an_approval_covers_only_the_principal_and_rule_it_was_asked_for() {
    let e = env(true).await;
    let holder = e.holder("node-a", 10);
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Async);
    let sent = |principal: &str, rule: &'static str| HoldRequest {
        principal: Some(principal.to_owned()),
        rule,
        ..request(&a, "agent-0", b"{}")
    };
    let queued = |outcome: HoldOutcome| match outcome {
        HoldOutcome::Queued { name } => name,
        other => panic!("expected queued, got {other:?}"),
    };
    let bob = queued(holder.hold(&sent("bob", "scale-prod")).await);
    let mallory = queued(holder.hold(&sent("mallory", "scale-prod")).await);
    let other_rule = queued(holder.hold(&sent("bob", "scale-anything")).await);
    assert_ne!(bob, mallory);
    assert_ne!(bob, other_rule);
    assert_eq!(e.access_requests(3).await.len(), 3);
    e.decide(&bob, Phase::Approved, "alice", None, None, true)
        .await;
    assert_eq!(
        holder.hold(&sent("mallory", "scale-prod")).await,
        HoldOutcome::Queued { name: mallory }
    );
    assert_eq!(
        holder.hold(&sent("bob", "scale-anything")).await,
        HoldOutcome::Queued { name: other_rule }
    );
    let approved = holder.hold(&sent("bob", "scale-prod")).await;
    assert!(
        matches!(&approved, HoldOutcome::Approved { name, .. } if *name == bob),
        "{approved:?}"
    );
}

#[tokio::test]
async fn a_grant_window_lets_identical_requests_through_until_it_ends() {
    let e = env(true).await;
    let holder = e.holder("node-a", 10);
    let a = approval(
        LONG,
        GrantSpec::For {
            duration: Duration::from_secs(2),
            scope: GrantScope::Identical,
        },
        ApprovalMode::Hold,
    );
    let held = hold_in_background(&holder, &a);
    let name = e.only_access_request().await;
    let until = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(2);
    e.decide(
        &name,
        Phase::Approved,
        "alice",
        None,
        Some(until.to_string()),
        true,
    )
    .await;
    let first = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("in time")
        .expect("task");
    assert!(
        matches!(
            first,
            HoldOutcome::Approved {
                via_grant: false,
                ..
            }
        ),
        "{first:?}"
    );
    let second = holder.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&second, HoldOutcome::Approved { via_grant: true, name: n, .. } if *n == name),
        "{second:?}"
    );
    // Another body is another request: not covered by an `identical` grant.
    let other = {
        let (holder, a) = (holder.clone(), a.clone());
        tokio::spawn(async move { holder.hold(&request(&a, "agent-0", b"{\"x\":1}")).await })
    };
    e.access_requests(2).await;
    other.abort();
    // After the window, the identical request waits again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let after = hold_in_background(&holder, &a);
    e.access_requests(3).await;
    assert!(!after.is_finished());
    after.abort();
}

/// A lasting grant covers the pod it was given to: not a pod created again under the same
/// name (another UID), and never a caller the kernel could not attribute to a pod (they
/// would all share it).
#[tokio::test]
async fn a_grant_covers_only_the_pod_it_was_given_to() {
    let e = env(true).await;
    let holder = e.holder("node-a", 10);
    let a = approval(
        LONG,
        GrantSpec::For {
            duration: Duration::from_secs(60),
            scope: GrantScope::Rule,
        },
        ApprovalMode::Hold,
    );
    // Another gateway, which has seen none of this holder's in-memory state.
    let other_node = e.holder("node-b", 10);
    let from_node = |holder: &Arc<Holder>, pod: &'static str, uid: Option<&'static str>| {
        let (holder, a) = (holder.clone(), a.clone());
        tokio::spawn(async move {
            let mut req = request(&a, pod, b"{}");
            req.workload.uid = uid.map(str::to_owned);
            if pod.is_empty() {
                req.workload.namespace.clear();
            }
            holder.hold(&req).await
        })
    };
    let from = |pod, uid| from_node(&holder, pod, uid);
    let until = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60)).to_string();
    let mut created = 0;
    for (pod, uid, covered_after) in [
        (
            "agent-0",
            Some("7c1f6a2e-0000-4000-8000-000000000001"),
            true,
        ),
        ("", None, false),
    ] {
        let held = from(pod, uid);
        created += 1;
        let ar = e
            .access_requests(created)
            .await
            .into_iter()
            .find(|ar| {
                ar.spec.requester.workload.pod == pod
                    && ar.spec.requester.workload.uid.as_deref() == uid
                    && ar.status.as_ref().is_none_or(|s| s.phase == Phase::Pending)
            })
            .expect("the new AccessRequest");
        assert_eq!(
            ar.spec.grant.duration.is_some(),
            covered_after,
            "{pod:?}: a window is offered to approvers only for an identified pod"
        );
        let name = ar.metadata.name.expect("name");
        e.decide(
            &name,
            Phase::Approved,
            "alice",
            None,
            Some(until.clone()),
            true,
        )
        .await;
        let first = tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("in time")
            .expect("task");
        assert!(
            matches!(
                first,
                HoldOutcome::Approved {
                    via_grant: false,
                    ..
                }
            ),
            "{pod:?}: {first:?}"
        );
        // Retried through another gateway, as a restarted or second node would see it.
        let again = from_node(&other_node, pod, uid);
        if covered_after {
            let again = tokio::time::timeout(Duration::from_secs(10), again)
                .await
                .expect("in time")
                .expect("task");
            assert!(
                matches!(&again, HoldOutcome::Approved { via_grant: true, name: n, .. } if *n == name),
                "{pod:?}: {again:?}"
            );
            // The same name with another UID is a new pod: it waits for its own decision.
            let recreated = from(pod, Some("7c1f6a2e-0000-4000-8000-000000000002"));
            created += 1;
            let ars = e.access_requests(created).await;
            assert!(
                ars.iter()
                    .any(|ar| ar.spec.requester.workload.uid.as_deref()
                        == Some("7c1f6a2e-0000-4000-8000-000000000002")),
                "the recreated pod's AccessRequest names its UID"
            );
            assert!(
                !recreated.is_finished(),
                "the recreated pod was let through"
            );
            recreated.abort();
            // The same pod with another principal's token, through the gateway that
            // holds the grant: its own decision too.
            let other_principal = {
                let (holder, a) = (other_node.clone(), a.clone());
                tokio::spawn(async move {
                    let mut req = request(&a, pod, b"{}");
                    req.workload.uid = uid.map(str::to_owned);
                    req.principal = Some("mallory".into());
                    holder.hold(&req).await
                })
            };
            created += 1;
            let ars = e.access_requests(created).await;
            assert!(
                ars.iter()
                    .any(|ar| ar.spec.requester.principal.as_deref() == Some("mallory")),
                "another principal's request asks for its own approval"
            );
            assert!(
                !other_principal.is_finished(),
                "another principal was let through"
            );
            other_principal.abort();
        } else {
            // An unattributed caller's approval opens no window.
            created += 1;
            e.access_requests(created).await;
            assert!(
                !again.is_finished(),
                "an unattributed retry was let through"
            );
            again.abort();
        }
    }
}

#[tokio::test]
async fn a_restarted_gateway_reuses_the_pending_request_and_another_node_releases_it() {
    let e = env(true).await;
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Hold);
    let first = e.holder("node-a", 10);
    let held = {
        let a = a.clone();
        tokio::spawn(async move { first.hold(&request(&a, "agent-0", b"{}")).await })
    };
    let name = e.only_access_request().await;
    // The gateway goes away while the request is pending: nothing was released.
    held.abort();
    let restarted = e.holder("node-a", 10);
    let retry = {
        let a = a.clone();
        let restarted = restarted.clone();
        tokio::spawn(async move { restarted.hold(&request(&a, "agent-0", b"{}")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        e.access_requests(1).await.len(),
        1,
        "the retry created a duplicate"
    );
    assert!(!retry.is_finished());
    // Decided "on node B" (any writer with the key): node A's holder sees it through the watch.
    e.decide(&name, Phase::Approved, "alice", None, None, true)
        .await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), retry)
        .await
        .expect("in time")
        .expect("task");
    assert!(
        matches!(&outcome, HoldOutcome::Approved { name: n, .. } if *n == name),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn pending_requests_are_capped_per_workload_and_api_errors_fail_closed() {
    let e = env(true).await;
    let holder = e.holder("node-a", 2);
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Async);
    for body in [&b"1"[..], b"2"] {
        assert!(matches!(
            holder.hold(&request(&a, "agent-0", body)).await,
            HoldOutcome::Queued { .. }
        ));
    }
    let third = holder.hold(&request(&a, "agent-0", b"3")).await;
    assert!(
        matches!(&third, HoldOutcome::Failed { why } if why.contains("already has 2 AccessRequests pending")),
        "{third:?}"
    );
    // Another workload has its own budget.
    assert!(matches!(
        holder.hold(&request(&a, "agent-1", b"3")).await,
        HoldOutcome::Queued { .. }
    ));

    // Without the CRD the API server has no accessrequests: refused, naming why.
    let bare = env(false).await;
    let holder = bare.holder("node-a", 10);
    let failed = holder.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&failed, HoldOutcome::Failed { why } if why.contains("AccessRequests in namespace chaperone-system")),
        "{failed:?}"
    );
    drop(bare.apiserver);
}

/// The watcher that releases held requests is down (here: never started): a decision
/// still reaches the held request, read by the request itself at its next poll, and a
/// forged decision does not release it (nor is it counted at every poll).
#[tokio::test]
async fn a_decision_reaches_a_held_request_while_the_watcher_is_down() {
    let e = env(true).await;
    let holder = Holder::new(
        e.client.clone(),
        HolderConfig {
            decision_poll: Duration::from_millis(200),
            ..e.config("node-a", 10, None)
        },
    );
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Hold);
    let held = hold_in_background(&holder, &a);
    let name = e.only_access_request().await;
    e.decide(&name, Phase::Approved, "mallory", None, None, false)
        .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !held.is_finished(),
        "a forged approval released the request"
    );
    assert_eq!(
        holder.tampering_attempts(),
        0,
        "counted by the watcher only"
    );
    e.decide(&name, Phase::Approved, "alice", None, None, true)
        .await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("released without the watcher")
        .expect("task");
    assert!(
        matches!(&outcome, HoldOutcome::Approved { decided_by, .. } if decided_by.as_deref() == Some("alice")),
        "{outcome:?}"
    );
}

/// AccessRequests are deleted once their expiry is `retention` behind: by the gateway of
/// the node that created them, or by any gateway once twice as long has passed (their node
/// is gone); current ones stay.
#[tokio::test]
async fn access_requests_past_their_retention_are_deleted() {
    let e = env(true).await;
    let (node_a, node_b) = (e.holder("node-a", 10), e.holder("node-b", 10));
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Async);
    for (holder, pod) in [(&node_a, "old-a"), (&node_b, "old-b"), (&node_a, "new-a")] {
        let outcome = holder.hold(&request(&a, pod, b"{}")).await;
        assert!(matches!(outcome, HoldOutcome::Queued { .. }), "{outcome:?}");
    }
    let week = Duration::from_secs(7 * 24 * 3600);
    let expire = |pod: &'static str, ago_days: i64| {
        let api = e.api();
        async move {
            let list = api.list(&Default::default()).await.expect("list");
            let mut ar = list
                .items
                .into_iter()
                .find(|ar| ar.spec.requester.workload.pod == pod)
                .expect("the pod's AccessRequest");
            ar.spec.expires_at = (jiff::Timestamp::now()
                - jiff::SignedDuration::from_hours(24 * ago_days))
            .to_string();
            let name = ar.metadata.name.clone().expect("name");
            api.replace(&name, &PostParams::default(), &ar)
                .await
                .expect("age it");
        }
    };
    expire("old-a", 8).await;
    expire("old-b", 8).await;
    let pods = |e: &Env| {
        let api = e.api();
        async move {
            let mut pods: Vec<String> = api
                .list(&Default::default())
                .await
                .expect("list")
                .items
                .into_iter()
                .map(|ar| ar.spec.requester.workload.pod)
                .collect();
            pods.sort();
            pods
        }
    };
    // node-a deletes its own old request; node-b's is not a week past twice yet.
    assert_eq!(node_a.sweep(week).await, Ok(1));
    assert_eq!(pods(&e).await, ["new-a", "old-b"]);
    assert_eq!(node_a.sweep(week).await, Ok(0), "nothing more");
    // Left two weeks and more: node-b is gone, and node-a deletes it.
    expire("old-b", 15).await;
    assert_eq!(node_a.sweep(week).await, Ok(1));
    assert_eq!(pods(&e).await, ["new-a"]);

    // The hourly rounds count what they delete, and the rounds that fail.
    use prometheus_client::metrics::counter::Counter;
    let (deleted, failures) = (Counter::default(), Counter::default());
    node_a.count_cleanup_in(deleted.clone(), failures.clone());
    expire("new-a", 8).await;
    // The janitor's first list is refused (it lists in pages of 500).
    e.apiserver.refuse_on(
        |r| {
            r.method == "GET"
                && r.path_and_query.contains("/accessrequests?")
                && r.path_and_query.contains("limit=500")
                && !r.path_and_query.contains("watch")
        },
        gateway_userspace::status::Status::failure(
            http::StatusCode::FORBIDDEN,
            "Forbidden",
            "accessrequests is forbidden",
        ),
    );
    let janitor = tokio::spawn(node_a.clone().run_janitor(week, Duration::from_millis(100)));
    for _ in 0..200 {
        if deleted.get() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    janitor.abort();
    assert_eq!((deleted.get(), failures.get()), (1, 1));
    assert!(pods(&e).await.is_empty());
}

/// Identical requests share one AccessRequest, so the pending cap does not bound how many
/// wait: the waiting cap does, per workload, without asking the API server; a slot comes
/// back when its request is decided or its client goes away.
#[tokio::test]
async fn held_requests_are_capped_per_workload_and_slots_come_back() {
    let e = env(true).await;
    let holder = e.holder_waiting("node-a", 2);
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Hold);
    let hold = |pod: &'static str| {
        let (holder, a) = (holder.clone(), a.clone());
        tokio::spawn(async move { holder.hold(&request(&a, pod, b"{}")).await })
    };
    let first = hold("agent-0");
    let second = hold("agent-0");
    let name = e.only_access_request().await;
    for _ in 0..200 {
        if holder.waiting() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(holder.waiting(), 2);
    let third = holder.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&third, HoldOutcome::Busy { why } if why.contains("already has 2 requests held")),
        "{third:?}"
    );
    // Another workload has its own slots.
    let other = hold("agent-1");
    e.access_requests(2).await;
    // A client that goes away gives its slot back.
    second.abort();
    let _ = second.await;
    assert_eq!(holder.waiting(), 2, "agent-0's first and agent-1's");
    let again = hold("agent-0");
    for _ in 0..200 {
        if holder.waiting() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(holder.waiting(), 3);
    e.decide(&name, Phase::Denied, "bob", None, None, true)
        .await;
    for task in [first, again] {
        let outcome = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("released")
            .expect("task");
        assert!(matches!(outcome, HoldOutcome::Denied { .. }), "{outcome:?}");
    }
    assert_eq!(holder.waiting(), 1, "agent-1's only");
    other.abort();
    let _ = other.await;
    assert_eq!(holder.waiting(), 0);
}

/// The gateway restarts while a request is held: nothing was forwarded, and the client's
/// retry through the restarted gateway finds the pending AccessRequest instead of creating
/// another; once approved, it goes through.
#[tokio::test]
async fn a_gateway_restart_while_pending_forwards_nothing_and_the_retry_reuses_the_request() {
    use bytes::Bytes;
    use gateway_userspace::{
        app,
        approval::ApprovalConfig,
        config::PolicyConfig,
        tls::{self, CertificateAuthority},
    };
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, ca_key) = CertificateAuthority::generate("restart-test-ca").expect("CA");
    let ca_pem = ca.cert_pem().to_owned();
    for (file, text) in [
        ("ca.crt", ca_pem.as_str()),
        ("ca.key", ca_key.as_str()),
        ("token", TOKEN),
        (
            "policy.yaml",
            "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: patch-config\n    action: approve\n    verbs: [patch]\n    resources: [configmaps]\n    approval: {approvers: {groups: [sre]}, timeout: 60s}\n",
        ),
    ] {
        std::fs::write(dir.path().join(file), text).expect("write");
    }
    std::fs::write(dir.path().join("seal.key"), [5u8; 32]).expect("seal key");
    let apiserver = TestApiServer::start(ApiServerConfig {
        ca: Some(Arc::new(ca)),
        tokens: vec![TOKEN.to_owned()],
        ..ApiServerConfig::default()
    })
    .await
    .expect("API test server");
    let crd: serde_json::Value = serde_norway::from_str(&crd_yaml().expect("crd")).expect("yaml");
    for object in [
        crd,
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "flags", "namespace": "default"}, "data": {"a": "0"}}),
    ] {
        apiserver.seed(object).expect("seed");
    }
    let mut config =
        chaperone_testkit::local::local_config(dir.path(), &apiserver.url()).expect("config");
    config.policy = Some(PolicyConfig::File(dir.path().join("policy.yaml")));
    config.approval = Some(ApprovalConfig {
        namespace: NS.to_owned(),
        seal_key_file: dir.path().join("seal.key"),
        api: None,
        notify: Default::default(),
        max_pending_per_workload: 10,
        max_waiting_per_workload: 1,
        retention: gateway_userspace::approval::config::DEFAULT_RETENTION,
    });

    let roots = tls::root_store_from_pem(&ca_pem, "test CA").expect("roots");
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls::client_config(roots).expect("client config"))
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let patch = |port: u16| {
        http::Request::builder()
            .method("PATCH")
            .uri(format!(
                "https://127.0.0.1:{port}/api/v1/namespaces/default/configmaps/flags"
            ))
            .header("content-type", "application/merge-patch+json")
            .header("authorization", "Bearer agent-token")
            .body(Full::new(Bytes::from_static(br#"{"data":{"a":"1"}}"#)))
            .expect("request")
    };
    async fn read(response: http::Response<hyper::body::Incoming>) -> (http::StatusCode, String) {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
    let flags = |apiserver: &TestApiServer| {
        apiserver
            .object("configmaps", "default", "flags")
            .and_then(|c| c.pointer("/data/a").cloned())
    };

    let first = app::build(config.clone()).await.expect("gateway");
    let held = tokio::spawn(client.request(patch(first.local_addr().port())));
    let ars = {
        let mut found = Vec::new();
        for _ in 0..200 {
            found = apiserver.objects("accessrequests", NS);
            if !found.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        found
    };
    assert_eq!(ars.len(), 1, "the held request has its AccessRequest");
    // `/status` (what `chaperone status` prints) shows the request held.
    let mut approvals = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, text) = chaperone_testkit::local::admin_get(first.admin_addr(), "/status")
            .await
            .expect("status");
        let status: serde_json::Value = serde_json::from_str(&text).expect("status JSON");
        approvals = status["approvals"].clone();
        if approvals["watch_current"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(approvals["waiting"], 1, "{approvals}");
    assert_eq!(approvals["watch_current"], true, "{approvals}");
    // The gateway restarts: the held request is answered at once (not at the end of the
    // drain), undecided and not sent; nothing reached the API server.
    let stopped = tokio::spawn(first.shutdown());
    let response = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("answered when the gateway stops")
        .expect("task")
        .expect("response");
    let (status, text) = read(response).await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(
        text.contains("the gateway is restarting") && text.contains("stays pending"),
        "{text}"
    );
    stopped
        .await
        .expect("shutdown task")
        .expect("stop the gateway");
    let patched = |apiserver: &TestApiServer| {
        apiserver
            .requests()
            .iter()
            .any(|r| r.method == "PATCH" && r.path_and_query.contains("/configmaps/flags"))
    };
    assert!(!patched(&apiserver), "a held request was forwarded");
    assert_eq!(flags(&apiserver), Some(serde_json::json!("0")));

    let second = app::build(config.clone()).await.expect("restarted gateway");
    let retry = tokio::spawn(client.request(patch(second.local_addr().port())));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        apiserver.objects("accessrequests", NS).len(),
        1,
        "the retry created a second AccessRequest"
    );
    assert!(!retry.is_finished(), "released without a decision");
    assert!(!patched(&apiserver));
    // The workload's one hold slot is taken: another request needing approval is refused
    // with 429 and a Retry-After (client-go waits and retries), not held.
    let busy = client
        .request(patch(second.local_addr().port()))
        .await
        .expect("response");
    assert_eq!(
        busy.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    let (status, text) = read(busy).await;
    assert_eq!(status, http::StatusCode::TOO_MANY_REQUESTS, "{text}");
    assert!(
        text.contains("\"reason\":\"TooManyRequests\"")
            && text.contains("1 requests held for approval"),
        "{text}"
    );
    assert_eq!(apiserver.objects("accessrequests", NS).len(), 1);

    let name = ars[0]["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_owned();
    let e = Env {
        client: {
            let upstream = upstream_for(&apiserver, dir.path(), TOKEN).expect("upstream");
            kube::Client::try_from(upstream.config).expect("client")
        },
        key: SealKey::new(vec![5; 32]).expect("key"),
        apiserver,
        _dir: tempfile::tempdir().expect("tempdir"),
    };
    e.decide(&name, Phase::Approved, "alice", None, None, true)
        .await;
    let response = tokio::time::timeout(Duration::from_secs(10), retry)
        .await
        .expect("released in time")
        .expect("task")
        .expect("response");
    let (status, text) = read(response).await;
    assert_eq!(status, http::StatusCode::OK, "{text}");
    assert_eq!(flags(&e.apiserver), Some(serde_json::json!("1")));
    second.shutdown().await.expect("stop");

    // A body larger than the gateway reads whole cannot be told from another, so no
    // approval could cover it: refused at once, and no AccessRequest is created.
    let mut small = config;
    small.limits.max_inspected_body_bytes = 8;
    let third = app::build(small).await.expect("gateway reading 8 bytes");
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(patch(third.local_addr().port())),
    )
    .await
    .expect("answered at once")
    .expect("response");
    let (status, text) = read(response).await;
    assert_eq!(status, http::StatusCode::FORBIDDEN, "{text}");
    assert!(
        text.contains("larger than the gateway reads whole"),
        "{text}"
    );
    assert_eq!(e.apiserver.objects("accessrequests", NS).len(), 1);
    third.shutdown().await.expect("stop");
}

/// A `once` approval lets exactly one request through, even for a gateway that never saw
/// it used (another node, a restart): it is marked consumed in the AccessRequest's status.
#[tokio::test]
async fn a_once_approval_is_used_once_across_gateways() {
    let e = env(true).await;
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Async);
    let node_a = e.holder("node-a", 10);
    let HoldOutcome::Queued { name } = node_a.hold(&request(&a, "agent-0", b"{}")).await else {
        panic!("expected queued");
    };
    e.decide(&name, Phase::Approved, "alice", None, None, true)
        .await;
    let used = node_a.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&used, HoldOutcome::Approved { name: n, .. } if *n == name),
        "{used:?}"
    );
    let ar = e.api().get(&name).await.expect("get");
    let status = ar.status.clone().expect("status");
    assert!(
        status.conditions.iter().any(|c| c.type_ == "Consumed"),
        "{status:?}"
    );
    assert_eq!(
        e.key.verify(&ar, &status),
        Ok(()),
        "the mark keeps the seal valid"
    );
    // Another gateway (or this one restarted) does not let the identical request through
    // on the used approval.
    let node_b = e.holder("node-b", 10);
    let again = node_b.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&again, HoldOutcome::Queued { name: n } if *n != name),
        "{again:?}"
    );
}

/// The `Consumed` mark is outside the seal: whoever may write the status can put the
/// approved status back without it. The node's own record still keeps the approval to one
/// use, across a restart of the gateway; without the record the approval would pass again.
#[tokio::test]
async fn a_once_approval_stays_used_on_its_node_when_the_mark_is_undone() {
    let e = env(true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("used");
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Async);
    let log = UsedLog::open(&path, jiff::Timestamp::now()).expect("open the record");
    let node_a = e.holder_recording_in("node-a", 10, Some(log.clone()));
    let HoldOutcome::Queued { name } = node_a.hold(&request(&a, "agent-0", b"{}")).await else {
        panic!("expected queued");
    };
    e.decide(&name, Phase::Approved, "alice", None, None, true)
        .await;
    let used = node_a.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&used, HoldOutcome::Approved { name: n, .. } if *n == name),
        "{used:?}"
    );
    let mut ar = e.api().get(&name).await.expect("get");
    let uid = ar.metadata.uid.clone().expect("uid");
    assert!(log.contains(&uid), "the use is on the node's disk");
    drop(node_a);
    // Someone with accessrequests/status write removes the mark; the seal still holds.
    let mut status = ar.status.clone().expect("status");
    status.conditions.retain(|c| c.type_ != "Consumed");
    assert_eq!(e.key.verify(&ar, &status), Ok(()));
    ar.status = Some(status);
    e.api()
        .replace_status(&name, &PostParams::default(), &ar)
        .await
        .expect("undo the mark");
    // The gateway restarts: it reads its record back and asks again.
    let reopened = UsedLog::open(&path, jiff::Timestamp::now()).expect("reopen the record");
    let restarted = e.holder_recording_in("node-a", 10, Some(reopened));
    let again = restarted.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&again, HoldOutcome::Queued { name: n } if *n != name),
        "{again:?}"
    );
    // What the record closes: a gateway without it lets the request through again.
    let forgetful = e.holder("node-a", 10);
    let reused = forgetful.hold(&request(&a, "agent-0", b"{}")).await;
    assert!(
        matches!(&reused, HoldOutcome::Approved { name: n, .. } if *n == name),
        "{reused:?}"
    );
}

/// A held request goes through only on the decision its AccessRequest holds, sealed, when
/// it is read back: a status written back to `Pending` by hand (with a `grantUntil`, once
/// the request was approved and used) picks the request up again, and the verdict seen
/// earlier must not release the new one.
#[tokio::test]
async fn a_status_written_back_to_pending_releases_nothing() {
    let e = env(true).await;
    let holder = e.holder("node-a", 10);
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Hold);
    let hold = |holder: Arc<Holder>, a: Approval| {
        tokio::spawn(async move { holder.hold(&request(&a, "agent-0", b"{}")).await })
    };
    let held = hold(holder.clone(), a.clone());
    let name = e.only_access_request().await;
    e.decide(&name, Phase::Approved, "alice", None, None, true)
        .await;
    let first = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("released in time")
        .expect("task");
    assert!(matches!(first, HoldOutcome::Approved { .. }), "{first:?}");
    // Someone with accessrequests/status write: back to Pending, with a grant window.
    let mut ar = e.api().get(&name).await.expect("get");
    ar.status = Some(AccessRequestStatus {
        phase: Phase::Pending,
        decided_by: Some("alice".into()),
        decided_at: Some(jiff::Timestamp::now().to_string()),
        grant_until: Some(
            jiff::Timestamp::now()
                .checked_add(jiff::SignedDuration::from_hours(1))
                .unwrap()
                .to_string(),
        ),
        ..Default::default()
    });
    e.api()
        .replace_status(&name, &PostParams::default(), &ar)
        .await
        .expect("rewrite the status");
    let again = tokio::time::timeout(Duration::from_secs(10), hold(holder.clone(), a.clone()))
        .await
        .map(|r| r.expect("task"));
    assert!(
        matches!(again, Ok(HoldOutcome::Failed { .. })),
        "released again on a status nobody sealed: {again:?}"
    );
    assert_eq!(holder.tampering_attempts(), 1, "the rewrite is counted");
}

/// A `once` approval whose use cannot be marked (the API server errs on the write) is not
/// used: that request is refused, and the identical retry goes through on the same
/// approval, without asking anyone again.
#[tokio::test]
async fn an_approval_that_cannot_be_marked_used_stays_for_the_retry() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let e = env(true).await;
    let holder = e.holder("node-a", 10);
    let a = approval(LONG, GrantSpec::Once, ApprovalMode::Hold);
    let hold = |holder: Arc<Holder>, a: Approval| {
        tokio::spawn(async move { holder.hold(&request(&a, "agent-0", b"{}")).await })
    };
    let first = hold(holder.clone(), a.clone());
    let name = e.only_access_request().await;
    // The status writes: the approval first, then the gateway's `Consumed` mark, which fails.
    let writes = Arc::new(AtomicUsize::new(0));
    let status_path = format!("accessrequests/{name}/status");
    e.apiserver.refuse_on(
        move |r| {
            r.method == "PUT"
                && r.path_and_query.contains(&status_path)
                && writes.fetch_add(1, Ordering::SeqCst) == 1
        },
        gateway_userspace::status::Status::failure(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "etcdserver: request timed out",
        ),
    );
    e.decide(&name, Phase::Approved, "alice", None, None, true)
        .await;
    let outcome = first.await.expect("hold task");
    assert!(
        matches!(&outcome, HoldOutcome::Failed { why } if why.contains("cannot be marked used")),
        "{outcome:?}"
    );
    // The retry: the same approval, now marked used, and no new AccessRequest.
    let retry = hold(holder.clone(), a.clone()).await.expect("hold task");
    assert!(
        matches!(&retry, HoldOutcome::Approved { name: n, .. } if *n == name),
        "{retry:?}"
    );
    assert_eq!(e.access_requests(1).await.len(), 1);
    // Used now: a third identical request is asked for again.
    let third = {
        let holder = holder.clone();
        let a = approval(
            Duration::from_millis(300),
            GrantSpec::Once,
            ApprovalMode::Hold,
        );
        tokio::spawn(async move { holder.hold(&request(&a, "agent-0", b"{}")).await })
    };
    let _ = e.access_requests(2).await;
    let _ = third.await;
}

/// Holds that arrive together for one workload are taken in turn: identical ones share one
/// AccessRequest (approvers are asked once), and the pending cap holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_arriving_together_ask_once_and_keep_the_cap() {
    let e = env(true).await;
    let holder = e.holder("node-a", 2);
    let a = approval(Duration::from_secs(2), GrantSpec::Once, ApprovalMode::Hold);
    let spawn = |body: &'static [u8]| {
        let holder = holder.clone();
        let a = a.clone();
        tokio::spawn(async move { holder.hold(&request(&a, "agent-0", body)).await })
    };
    let identical: Vec<_> = (0..6).map(|_| spawn(b"{}")).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        e.api()
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        1,
        "identical requests arriving together ask once"
    );
    // Distinct requests: one more fits under the cap of 2, the others are refused.
    let bodies: [&'static [u8]; 4] = [b"{\"a\":1}", b"{\"a\":2}", b"{\"a\":3}", b"{\"a\":4}"];
    let distinct: Vec<_> = bodies.into_iter().map(spawn).collect();
    let mut refused = 0;
    for task in distinct {
        if matches!(task.await.expect("hold task"), HoldOutcome::Failed { why } if why.contains("already has"))
        {
            refused += 1;
        }
    }
    assert_eq!(refused, 3, "the cap of 2 pending held");
    assert_eq!(
        e.api()
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );
    for task in identical {
        let _ = task.await;
    }
}
