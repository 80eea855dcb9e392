//! Tests of the whole chain: cgroup id → path → pod → identity, and the config.

use super::{pods::fake, resolver::testing::*, *};

const UID: &str = "5d6e7f80-91a2-4b3c-8d4e-5f6071829304";
const ID: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

fn config_from_yaml(yaml: &str) -> Result<IdentityConfig, String> {
    let de = serde_norway::Deserializer::from_str(yaml);
    serde_path_to_error::deserialize(de).map_err(|e| format!("{}: {}", e.path(), e.inner()))
}

#[test]
fn config_parses_with_defaults_and_rejects_unknown_fields() {
    let config = config_from_yaml(
        r#"
watchPods: true
tokenReview: true
tokenCacheTtl: 30s
workloads:
  - cgroup: /chaperone-demo/agent
    namespace: demo
    pod: agent
    serviceAccount: agent
    labels: {app: agent}
  - cgroup: chaperone-demo/tools
    match: prefix
    namespace: demo
    pod: tools
oidc:
  - issuerUrl: https://issuer.example
    clientId: chaperone
    usernameClaim: email
    groupsClaim: groups
    groupsPrefix: "oidc:"
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.watch_pods && config.token_review);
    assert_eq!(config.token_cache_ttl, Duration::from_secs(30));
    assert_eq!(config.cgroup_rescan_interval, Duration::from_millis(500));
    assert_eq!(config.workloads[0].match_, CgroupMatch::Exact);
    assert_eq!(config.workloads[1].match_, CgroupMatch::Prefix);
    assert_eq!(config.workloads[1].service_account, "default");
    assert_eq!(config.oidc[0].username_claim, "email");
    config.validate().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config_from_yaml("{}").unwrap_or_else(|e| panic!("{e}")),
        IdentityConfig::default()
    );

    let cases = [
        ("watchPod: true", "unknown field"),
        (
            "workloads: [{cgroup: a, namespace: n, pod: p, sa: x}]",
            "workloads[0]",
        ),
        (
            "oidc: [{issuerUrl: https://x, clientId: c, extra: 1}]",
            "oidc[0]",
        ),
        ("tokenCacheTtl: -5s", "negative"),
        (
            "workloads: [{cgroup: a, match: regex, namespace: n, pod: p}]",
            "workloads[0].match",
        ),
    ];
    for (yaml, want) in cases {
        let err = config_from_yaml(yaml).expect_err(yaml);
        assert!(err.contains(want), "{yaml}: {err}");
    }
}

#[test]
fn absolute_cgroup_paths_are_read_against_the_cgroup2_mount_or_refused_with_the_fix() {
    let mount = std::path::Path::new("/sys/fs/cgroup/unified");
    let w = |cgroup: &str| StaticWorkload {
        cgroup: cgroup.to_owned(),
        match_: CgroupMatch::Exact,
        namespace: "n".to_owned(),
        pod: "p".to_owned(),
        service_account: "default".to_owned(),
        container: None,
        labels: BTreeMap::new(),
    };
    for (given, relative) in [
        (
            "/sys/fs/cgroup/unified/kubepods.slice/x",
            "kubepods.slice/x",
        ),
        ("/sys/fs/cgroup/unified/a/", "a"),
        ("/demo/agent", "demo/agent"),
        ("demo/agent", "demo/agent"),
    ] {
        let workload = w(given);
        let got = workload
            .relative_cgroup("w", Some(mount))
            .unwrap_or_else(|e| panic!("{given}: {e}"));
        assert_eq!(got, relative, "{given}");
    }
    for given in [
        "/sys/fs/cgroup/memory/x",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ] {
        let err = w(given)
            .relative_cgroup("identity.workloads[3]", Some(mount))
            .err()
            .unwrap_or_else(|| panic!("{given} accepted"))
            .to_string();
        assert!(
            err.contains("identity.workloads[3].cgroup")
                && err.contains("/sys/fs/cgroup/unified")
                && err.contains("relative to that mount"),
            "{given}: {err}"
        );
    }
    let err = w("/sys/fs/cgroup/x").relative_cgroup("w", None).err();
    assert!(err.is_some_and(|e| e.to_string().contains("no cgroup2 mount")));
}

#[test]
fn validation_names_the_field() {
    let workload = |cgroup: &str, namespace: &str| StaticWorkload {
        cgroup: cgroup.to_owned(),
        match_: CgroupMatch::Exact,
        namespace: namespace.to_owned(),
        pod: "p".to_owned(),
        service_account: "default".to_owned(),
        container: None,
        labels: BTreeMap::new(),
    };
    let issuer = |url: &str, client: &str| OidcIssuerConfig {
        issuer_url: url.to_owned(),
        client_id: client.to_owned(),
        username_claim: "sub".to_owned(),
        username_prefix: None,
        groups_claim: None,
        groups_prefix: None,
        ca_file: None,
    };
    let cases = [
        (
            vec![workload("/", "n")],
            vec![],
            "identity.workloads[0].cgroup",
        ),
        (
            vec![workload("a/../b", "n")],
            vec![],
            "identity.workloads[0].cgroup",
        ),
        (
            vec![workload("a", "n"), workload("b", "")],
            vec![],
            "identity.workloads[1].namespace",
        ),
        (
            vec![],
            vec![issuer("http://issuer", "c")],
            "identity.oidc[0].issuerUrl",
        ),
        (
            vec![],
            vec![issuer("not a url", "c")],
            "identity.oidc[0].issuerUrl",
        ),
        (
            vec![],
            vec![issuer("https://issuer", "")],
            "identity.oidc[0].clientId",
        ),
    ];
    for (workloads, oidc, want) in cases {
        let config = IdentityConfig {
            workloads,
            oidc,
            ..IdentityConfig::default()
        };
        let err = config.validate().expect_err(want).to_string();
        assert!(err.starts_with(want), "{want}: {err}");
    }
}

fn identity_with(workloads: Vec<StaticWorkload>, pods: PodStore) -> Identity {
    let config = IdentityConfig {
        workloads,
        ..IdentityConfig::default()
    };
    Identity::new(&config, "node-a", None, pods).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn static_workloads_match_exact_before_longest_prefix() {
    let w = |cgroup: &str, m: CgroupMatch, pod: &str| StaticWorkload {
        cgroup: cgroup.to_owned(),
        match_: m,
        namespace: "demo".to_owned(),
        pod: pod.to_owned(),
        service_account: format!("{pod}-sa"),
        container: None,
        labels: [("role".to_owned(), pod.to_owned())].into(),
    };
    let identity = identity_with(
        vec![
            w("/demo", CgroupMatch::Prefix, "outer"),
            w("demo/agents/", CgroupMatch::Prefix, "agents"),
            w("/demo/agents/special", CgroupMatch::Exact, "special"),
        ],
        PodStore::new(),
    );
    let cases = [
        ("demo", Some("outer")),
        ("/demo/other", Some("outer")),
        ("demo/agents", Some("agents")),
        ("demo/agents/a1/sub", Some("agents")),
        ("demo/agents/special", Some("special")),
        ("demo/agents/special/child", Some("agents")),
        ("demonstration", None),
        ("other/demo", None),
    ];
    for (path, want) in cases {
        let got = identity.resolve_path(path);
        assert_eq!(got.pod.as_deref(), want, "{path}");
        if let Some(pod) = want {
            assert_eq!(got.namespace.as_deref(), Some("demo"));
            assert_eq!(got.service_account, Some(format!("{pod}-sa")));
            assert_eq!(got.labels.get("role").map(String::as_str), Some(pod));
            assert_eq!(got.node, "node-a");
        }
    }
}

#[test]
fn pod_paths_resolve_through_the_store() {
    let pods = PodStore::new();
    pods.apply(&fake::pod(
        "agents",
        "agent-0",
        UID,
        "agent",
        &[("main", &format!("containerd://{ID}"))],
    ));
    let identity = identity_with(Vec::new(), pods.clone());
    let uid_ = UID.replace('-', "_");
    let base =
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice");
    let sandbox = "ab".repeat(32);
    let cases = [
        (
            format!("{base}/cri-containerd-{ID}.scope"),
            Some("agent-0"),
            Some("main"),
        ),
        (
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            Some("agent-0"),
            Some("main"),
        ),
        (
            format!("{base}/cri-containerd-{sandbox}.scope"),
            Some("agent-0"),
            None,
        ),
        (
            format!("{base}/crio-conmon-{ID}.scope"),
            Some("agent-0"),
            None,
        ),
        (base.clone(), Some("agent-0"), None),
        ("system.slice/sshd.service".to_owned(), None, None),
    ];
    for (path, pod, container) in cases {
        let got = identity.resolve_path(&path);
        assert_eq!(got.pod.as_deref(), pod, "{path}");
        assert_eq!(got.container.as_deref(), container, "{path}");
        if pod.is_some() {
            assert_eq!(got.namespace.as_deref(), Some("agents"));
            assert_eq!(got.service_account.as_deref(), Some("agent"));
            assert_eq!(got.pod_uid.as_deref(), Some(UID));
            assert!(got.is_known());
        } else {
            assert!(!got.is_known());
        }
    }
    // A pod UID the store does not know (yet): the UID is still reported.
    pods.resync(&[]);
    let got = identity.resolve_path(&format!("{base}/cri-containerd-{ID}.scope"));
    assert_eq!((got.pod_uid.as_deref(), got.pod), (Some(UID), None));
}

#[test]
fn record_carries_kernel_and_pod_fields() {
    let identity = WorkloadIdentity {
        node: "n".to_owned(),
        namespace: Some("ns".to_owned()),
        pod: Some("p".to_owned()),
        pod_uid: Some(UID.to_owned()),
        service_account: Some("sa".to_owned()),
        container: Some("c".to_owned()),
        cgroup_id: 42,
        ..WorkloadIdentity::default()
    };
    let origin = ConnectionOrigin {
        original_dst: "192.0.2.1:443".parse().unwrap_or_else(|e| panic!("{e}")),
        cgroup_id: 42,
        netns_cookie: u64::MAX,
        pid: 7,
        command: "kubectl".to_owned(),
    };
    let record = identity.record(&origin);
    assert_eq!(record.cgroup_id, 42);
    assert_eq!(
        record.netns_cookie,
        i64::MAX,
        "out-of-range cookies saturate"
    );
    assert_eq!(record.pid, 7);
    assert_eq!(record.command.as_deref(), Some("kubectl"));
    assert_eq!(record.pod.as_deref(), Some("p"));
    assert_eq!(record.service_account.as_deref(), Some("sa"));
    assert_eq!(record.container.as_deref(), Some("c"));
}

#[test]
fn real_cgroups_resolve_end_to_end_in_both_layouts_and_standalone() {
    let Some(root) = cgroup2_for_tests("identity end to end") else {
        return;
    };
    let mut tree = TestTree::new(&root, "identity");
    let uid_ = UID.replace('-', "_");
    let (systemd_id, _) = tree.mkdir(&format!(
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
    ));
    let (cgroupfs_id, _) = tree.mkdir(&format!("kubepods/burstable/pod{UID}/{ID}"));
    let (agent_id, agent_path) = tree.mkdir("demo/agent");
    let (other_id, _) = tree.mkdir("demo/other");
    let (absolute_id, absolute_path) = tree.mkdir("demo/absolute");

    let pods = PodStore::new();
    pods.apply(&fake::pod(
        "agents",
        "agent-0",
        UID,
        "agent",
        &[("main", &format!("cri-o://{ID}"))],
    ));
    let config = IdentityConfig {
        workloads: vec![
            StaticWorkload {
                cgroup: format!("/{agent_path}"),
                match_: CgroupMatch::Exact,
                namespace: "demo".to_owned(),
                pod: "standalone-agent".to_owned(),
                service_account: "agent".to_owned(),
                container: None,
                labels: BTreeMap::new(),
            },
            // As an admin copies it from the file system: absolute, below the mount.
            StaticWorkload {
                cgroup: root.join(&absolute_path).display().to_string(),
                match_: CgroupMatch::Exact,
                namespace: "demo".to_owned(),
                pod: "absolute-agent".to_owned(),
                service_account: "agent".to_owned(),
                container: None,
                labels: BTreeMap::new(),
            },
        ],
        ..IdentityConfig::default()
    };
    let resolver = CgroupResolver::new(
        root,
        ResolverLimits {
            min_rescan_interval: Duration::ZERO,
            ..ResolverLimits::default()
        },
    );
    let identity =
        Identity::new(&config, "node-a", Some(resolver), pods).unwrap_or_else(|e| panic!("{e}"));
    let origin = |cgroup_id| ConnectionOrigin {
        original_dst: "192.0.2.1:443".parse().unwrap_or_else(|e| panic!("{e}")),
        cgroup_id,
        netns_cookie: 1,
        pid: 1,
        command: "kubectl".to_owned(),
    };
    for id in [systemd_id, cgroupfs_id] {
        let got = identity.resolve(&origin(id));
        assert_eq!(got.cgroup_id, id);
        assert_eq!(
            (
                got.namespace.as_deref(),
                got.pod.as_deref(),
                got.container.as_deref()
            ),
            (Some("agents"), Some("agent-0"), Some("main")),
            "{got:?}"
        );
    }
    let got = identity.resolve(&origin(agent_id));
    assert_eq!(got.pod.as_deref(), Some("standalone-agent"));
    let got = identity.resolve(&origin(absolute_id));
    assert_eq!(got.pod.as_deref(), Some("absolute-agent"), "{got:?}");
    let got = identity.resolve(&origin(other_id));
    assert!(!got.is_known(), "{got:?}");
    assert!(got.cgroup_path.is_some());
    // An id that does not exist anywhere: only the id is known.
    let got = identity.resolve(&origin(u64::MAX));
    assert_eq!(
        got,
        WorkloadIdentity {
            node: "node-a".to_owned(),
            cgroup_id: u64::MAX,
            ..WorkloadIdentity::default()
        }
    );
}
