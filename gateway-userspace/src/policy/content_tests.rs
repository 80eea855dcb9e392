//! Tests of `when` (CEL) and `exec` conditions through the whole policy.

use http::{Method, Uri};
use serde_json::{Value, json};

use super::*;

fn policy(body: &str) -> Result<Policy, PolicyError> {
    let text = format!("apiVersion: chaperone.dev/v1alpha1\nkind: Policy\n{body}");
    Policy::from_yaml(&text, "policy.yaml")
}

fn load(body: &str) -> Policy {
    policy(body).unwrap_or_else(|e| panic!("policy must load: {e}"))
}

fn request(method: &str, uri: &str) -> (RequestInfo, Uri) {
    let uri: Uri = uri.parse().expect("uri");
    let info = RequestInfo::parse(
        &Method::from_bytes(method.as_bytes()).expect("method"),
        &uri,
    )
    .expect("request");
    (info, uri)
}

const NO_PRIVILEGED: &str = r#"
default: allow
rules:
  - name: no-privileged
    action: deny
    verbs: [create, update, patch]
    resources: [pods]
    when:
      - >-
        object.spec.containers.exists(c, has(c.securityContext) &&
        has(c.securityContext.privileged) && c.securityContext.privileged)
"#;

fn pod(privileged: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "a", "image": "x"},
                                   {"name": "b", "image": "y", "securityContext": {"privileged": privileged}}]}})
}

#[test]
fn when_conditions_see_the_object() {
    let p = load(NO_PRIVILEGED);
    let (info, _) = request("POST", "/api/v1/namespaces/default/pods");
    for (privileged, want) in [(true, Action::Deny), (false, Action::Allow)] {
        let obj = pod(privileged);
        let ctx = RequestContext::new(&info).with_content(Content::Known(&obj), Content::Absent);
        assert_eq!(decide(&p, &ctx).action, want, "privileged={privileged}");
    }
    // A request the rule does not apply to never evaluates it, nor asks for content.
    let (get, _) = request("GET", "/api/v1/namespaces/default/pods/p");
    let ctx = RequestContext::new(&get).with_content(Content::Pending, Content::Pending);
    assert_eq!(
        evaluate(&p, &ctx),
        Evaluation::Decided(decide(&p, &RequestContext::new(&get)))
    );
}

#[test]
fn a_pending_object_is_asked_for_and_unavailable_content_denies() {
    let p = load(NO_PRIVILEGED);
    let (info, _) = request("PATCH", "/api/v1/namespaces/default/pods/p");
    let ctx = RequestContext::new(&info).with_content(Content::Pending, Content::Pending);
    assert_eq!(
        evaluate(&p, &ctx),
        Evaluation::NeedsContent {
            rule: Arc::from("no-privileged"),
            object: true,
            old_object: false
        }
    );
    assert_eq!(decide(&p, &ctx).action, Action::Deny, "decide fails closed");
    let ctx = RequestContext::new(&info).with_content(
        Content::Unavailable("body too large to inspect"),
        Content::Absent,
    );
    match evaluate(&p, &ctx) {
        Evaluation::ConditionFailed(d) => {
            assert_eq!(d.action, Action::Deny);
            assert!(
                d.reason().contains("body too large to inspect"),
                "{}",
                d.reason()
            );
        }
        other => panic!("want a failed condition, got {other:?}"),
    }
}

#[test]
fn runtime_errors_deny_with_the_reason() {
    let p = load(
        "default: allow\nrules:\n  - name: r\n    action: allow\n    verbs: ['*']\n    resources: ['*']\n    when: ['object.spec.replicas > 1']\n",
    );
    let (info, _) = request("POST", "/apis/apps/v1/namespaces/default/deployments");
    let obj = json!({"kind": "Deployment", "spec": {}});
    let ctx = RequestContext::new(&info).with_content(Content::Known(&obj), Content::Absent);
    let Evaluation::ConditionFailed(d) = evaluate(&p, &ctx) else {
        panic!("a missing field is an error");
    };
    assert!(
        d.reason().contains("object.spec.replicas > 1"),
        "{}",
        d.reason()
    );
    // A non-boolean result is an error too.
    let p = load(
        "default: allow\nrules:\n  - name: r\n    action: allow\n    verbs: ['*']\n    resources: ['*']\n    when: ['request.name']\n",
    );
    let Evaluation::ConditionFailed(d) = evaluate(&p, &ctx) else {
        panic!("a string is not a condition");
    };
    assert!(d.reason().contains("not a boolean"), "{}", d.reason());
}

#[test]
fn request_workload_and_principal_variables() {
    let p = load(
        r#"
default: deny
rules:
  - name: own-namespace
    action: allow
    verbs: ['*']
    resources: ['*']
    when:
      - request.namespace == workload.namespace
      - request.operation == "CREATE" && request.resource.resource == "configmaps"
      - "'agents' in principal.groups"
      - workload.labels["app"] == "cursor"
"#,
    );
    let (info, _) = request("POST", "/api/v1/namespaces/team-a/configmaps");
    let mut w = crate::identity::WorkloadIdentity {
        namespace: Some("team-a".to_owned()),
        pod: Some("cursor-0".to_owned()),
        ..Default::default()
    };
    w.labels.insert("app".to_owned(), "cursor".to_owned());
    let mut principal = crate::identity::principal::Principal::anonymous();
    principal.groups = vec!["agents".to_owned()];
    let obj = json!({"kind": "ConfigMap"});
    let ctx = RequestContext::new(&info)
        .with_workload(&w)
        .with_principal(&principal)
        .with_content(Content::Known(&obj), Content::Absent);
    assert_eq!(decide(&p, &ctx).action, Action::Allow);
    w.namespace = Some("team-b".to_owned());
    let ctx = RequestContext::new(&info)
        .with_workload(&w)
        .with_principal(&principal)
        .with_content(Content::Known(&obj), Content::Absent);
    assert_eq!(decide(&p, &ctx).action, Action::Deny);
}

#[test]
fn expensive_conditions_are_bounded() {
    // Three nested comprehensions over a large list: estimated, refused, denied.
    let p = load(
        "default: allow\nrules:\n  - name: r\n    action: allow\n    verbs: ['*']\n    resources: ['*']\n    when: ['object.items.all(a, object.items.all(b, object.items.all(c, a + b + c >= 0)))']\n",
    );
    let (info, _) = request("POST", "/api/v1/namespaces/default/configmaps");
    let obj = json!({"items": (0..2000).collect::<Vec<_>>()});
    let ctx = RequestContext::new(&info).with_content(Content::Known(&obj), Content::Absent);
    let started = std::time::Instant::now();
    let Evaluation::ConditionFailed(d) = evaluate(&p, &ctx) else {
        panic!("over the cost limit");
    };
    assert!(d.reason().contains("exceeds the limit"), "{}", d.reason());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "not run"
    );
    // Small inputs to the same expression run.
    let small = json!({"items": [1, 2, 3]});
    let ctx = RequestContext::new(&info).with_content(Content::Known(&small), Content::Absent);
    assert_eq!(decide(&p, &ctx).action, Action::Allow);
}

#[test]
fn bad_conditions_are_load_errors_with_file_and_line() {
    let cases = [
        (
            "when: ['object.spec.']",
            "rules[0].when[0]",
            "invalid CEL expression",
        ),
        (
            "when: ['foo == 1']",
            "rules[0].when[0]",
            "unknown variable 'foo'",
        ),
        ("when: []", "rules[0].when", "omit the key"),
        (
            "when: ['object.a.all(x, object.a.all(y, object.a.all(z, object.a.all(w, true))))']",
            "rules[0].when[0]",
            "nests comprehensions",
        ),
        ("exec: {commands: ['rm *']}", "rules[0].exec", "pods/exec"),
    ];
    for (field, path, want) in cases {
        let body = format!(
            "default: allow\nrules:\n  - name: r\n    action: deny\n    verbs: ['*']\n    resources: [pods]\n    {field}\n"
        );
        let e = policy(&body).expect_err(field).to_string();
        assert!(e.starts_with("policy.yaml:9:"), "{field}: {e}");
        assert!(e.contains(path) && e.contains(want), "{field}: {e}");
    }
    let long = format!("when: ['{}']", "1 == 1 && ".repeat(500) + "true");
    let body = format!(
        "default: allow\nrules:\n  - name: r\n    action: deny\n    verbs: ['*']\n    resources: [pods]\n    {long}\n"
    );
    assert!(
        policy(&body)
            .expect_err("too long")
            .to_string()
            .contains("bytes long")
    );
    let deep = format!("when: ['{}true{}']", "(".repeat(40), ")".repeat(40));
    let body = format!(
        "default: allow\nrules:\n  - name: r\n    action: deny\n    verbs: ['*']\n    resources: [pods]\n    {deep}\n"
    );
    assert!(
        policy(&body)
            .expect_err("too deep")
            .to_string()
            .contains("deep")
    );
}

#[test]
fn exec_rules_match_commands_and_interactivity() {
    let p = load(
        r#"
default: allow
rules:
  - name: no-rm
    action: deny
    verbs: [create, get]
    resources: [pods/exec]
    exec: {commands: ["rm -rf *"]}
  - name: no-shells
    action: deny
    verbs: [create, get]
    resources: [pods/exec, pods/attach]
    exec: {interactive: true}
"#,
    );
    let decide_exec = |uri: &str| {
        let (info, uri) = request("POST", uri);
        let exec = ExecRequest::from_uri(&uri);
        let ctx = RequestContext::new(&info).with_exec(Some(&exec), false);
        decide(&p, &ctx).rule.map(|r| r.to_string())
    };
    let base = "/api/v1/namespaces/default/pods/p/exec?container=app&stdout=true&stderr=true";
    assert_eq!(
        decide_exec(&format!("{base}&command=rm&command=-rf&command=%2F")).as_deref(),
        Some("no-rm")
    );
    assert_eq!(decide_exec(&format!("{base}&command=ls")), None);
    assert_eq!(
        decide_exec(&format!("{base}&command=sh&stdin=true&tty=true")).as_deref(),
        Some("no-shells")
    );
    assert_eq!(
        decide_exec("/api/v1/namespaces/default/pods/p/attach?container=app&stdin=true&tty=true")
            .as_deref(),
        Some("no-shells")
    );
}

#[test]
fn stdin_line_rules_travel_with_allowed_sessions_and_accumulate() {
    let p = load(
        r#"
default: deny
rules:
  - name: no-secrets-typed
    action: mask
    verbs: [create, get]
    resources: [pods/exec]
    exec: {stdinLines: {deny: ['cat\s+/etc/shadow']}}
  - name: no-rm
    action: deny
    verbs: [create, get]
    resources: [pods/exec]
    exec: {commands: ["rm -rf *"]}
  - name: shells
    action: allow
    verbs: [create, get]
    resources: [pods/exec]
    exec:
      interactive: true
      stdinLines: {deny: ['rm\s+-r', '^\s*curl '], message: no destructive commands}
"#,
    );
    let decide_exec = |uri: &str| {
        let (info, uri) = request("POST", uri);
        let exec = ExecRequest::from_uri(&uri);
        let ctx = RequestContext::new(&info).with_exec(Some(&exec), false);
        decide(&p, &ctx)
    };
    let base = "/api/v1/namespaces/default/pods/p/exec?container=app&stdout=true";
    let shell = decide_exec(&format!("{base}&command=sh&stdin=true"));
    assert_eq!(shell.action, Action::Mask);
    let rules = shell.stdin_lines.expect("line rules for the shell");
    assert_eq!(
        rules
            .rule_names()
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>(),
        ["no-secrets-typed", "shells"],
        "mask rules' line rules accumulate with the deciding rule's"
    );
    let v = rules.check("rm -rf /tmp/x").expect("matches");
    assert_eq!((&*v.rule, v.index), ("shells", 0));
    assert!(
        v.reason().contains("no destructive commands"),
        "{}",
        v.reason()
    );
    assert_eq!(
        rules
            .check("cat /etc/shadow")
            .map(|v| v.rule.to_string())
            .as_deref(),
        Some("no-secrets-typed")
    );
    assert!(rules.check("ls -la").is_none());
    // A denied request carries none; a non-interactive allowed one only the mask rule's.
    let denied = decide_exec(&format!("{base}&command=rm&command=-rf&command=%2F"));
    assert_eq!((denied.action, denied.stdin_lines), (Action::Deny, None));
    let (info, _) = request("GET", "/api/v1/namespaces/default/pods");
    assert_eq!(decide(&p, &RequestContext::new(&info)).stdin_lines, None);
}

#[test]
fn bad_stdin_line_rules_are_load_errors() {
    for (action, field, want) in [
        (
            "deny",
            "exec: {stdinLines: {deny: [x]}}",
            "policy.yaml:9:24: rules[0].exec.stdinLines: stdin line rules apply to sessions a rule allows",
        ),
        (
            "allow",
            "exec: {stdinLines: {deny: [ok, '(']}}",
            "rules[0].exec.stdinLines.deny[1]: invalid regex",
        ),
        (
            "allow",
            "exec: {stdinLines: {deny: []}}",
            "rules[0].exec.stdinLines.deny: lists no pattern",
        ),
        (
            "allow",
            "exec: {stdinLines: {denied: [x]}}",
            "rules[0].exec.stdinLines: unknown field 'denied'",
        ),
    ] {
        let body = format!(
            "default: allow\nrules:\n  - name: r\n    action: {action}\n    verbs: ['*']\n    resources: [pods/exec]\n    {field}\n"
        );
        let e = policy(&body).expect_err(field).to_string();
        assert!(e.contains(want), "{field}: {e}");
    }
}

#[test]
fn loops_over_parts_of_elements_are_amortized_and_pod_spec_finds_templates() {
    // Secret references in env of every container: a loop inside a loop over the parts of
    // each element, which visits each env entry once in total.
    let p = load(
        r#"
default: allow
rules:
  - name: no-secret-env
    action: deny
    verbs: [create]
    apiGroups: ["", apps, batch]
    resources: ["*"]
    when:
      - >-
        podSpec.containers.exists(c, has(c.env) &&
        c.env.exists(e, has(e.valueFrom) && has(e.valueFrom.secretKeyRef)))
"#,
    );
    let env = |secret: bool| -> Vec<Value> {
        (0..60)
            .map(|i| {
                if secret && i == 59 {
                    json!({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
                } else {
                    json!({"name": format!("V{i}"), "value": "v"})
                }
            })
            .collect()
    };
    let containers = |secret: bool| -> Vec<Value> {
        (0..30)
            .map(|i| json!({"name": format!("c{i}"), "image": "x", "env": env(secret && i == 29)}))
            .collect()
    };
    let (info, _) = request("POST", "/apis/batch/v1/namespaces/default/cronjobs");
    for (secret, want) in [(true, Action::Deny), (false, Action::Allow)] {
        let obj = json!({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": containers(secret)}}}}}});
        let ctx = RequestContext::new(&info).with_content(Content::Known(&obj), Content::Absent);
        assert_eq!(
            evaluate(&p, &ctx),
            Evaluation::Decided(Decision {
                action: want,
                rule: (want == Action::Deny).then(|| Arc::from("no-secret-env")),
                message: None,
                masking: None,
                stdin_lines: None,
                approval: None,
            }),
            "secret={secret}"
        );
    }
    // The same size of input in a cross product of two unrelated lists is refused.
    let cross = load(
        "default: allow\nrules:\n  - name: r\n    action: allow\n    verbs: ['*']\n    resources: ['*']\n    when: ['object.a.exists(x, object.b.exists(y, x == y))']\n",
    );
    let obj = json!({"a": (0..2000).collect::<Vec<_>>(), "b": (0..2000).collect::<Vec<_>>()});
    let ctx = RequestContext::new(&info).with_content(Content::Known(&obj), Content::Absent);
    assert!(matches!(
        evaluate(&cross, &ctx),
        Evaluation::ConditionFailed(_)
    ));
}
