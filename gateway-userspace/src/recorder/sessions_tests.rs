use super::*;
use crate::recorder::schema::{ObjectRef, WorkloadRecord};
use crate::request::Verb;

fn ts(text: &str) -> jiff::Timestamp {
    text.parse()
        .unwrap_or_else(|e| panic!("bad timestamp {text}: {e}"))
}

fn request(audit_id: &str, time: &str, pod: &str, verb: Verb, uri: &str) -> RequestRecord {
    RequestRecord {
        request_time: ts(time),
        audit_id: audit_id.into(),
        verb,
        request_uri: uri.into(),
        outcome: Outcome::Forwarded,
        response_code: 200,
        workload: WorkloadRecord {
            namespace: Some("agents".into()),
            pod: Some(pod.into()),
            pod_uid: Some(format!("uid-{pod}")),
            service_account: Some("cursor".into()),
            ..WorkloadRecord::default()
        }
        .into(),
        object_ref: ObjectRef {
            resource: "pods".into(),
            namespace: "default".into(),
            ..ObjectRef::default()
        },
        ..RequestRecord::default()
    }
}

fn frame(session: &str, seq: i64, offset_us: i64, event: FrameEventKind) -> ExecFrameRecord {
    ExecFrameRecord {
        session_id: session.into(),
        audit_id: session.into(),
        seq,
        time: ts("2026-12-03T10:00:00Z") + jiff::SignedDuration::from_micros(offset_us),
        offset_us,
        event,
        ..ExecFrameRecord::default()
    }
}

#[test]
fn exec_sessions_and_runs_are_listed_and_filtered() {
    let mut exec = request(
        "exec-1",
        "2026-12-03T10:00:00Z",
        "agent-a",
        Verb::Get,
        "/api/v1/namespaces/default/pods/web/exec?command=sh&command=-c&command=echo+hi&container=app&stdout=true",
    );
    exec.object_ref.subresource = "exec".into();
    exec.object_ref.name = "web".into();
    let requests = vec![
        exec,
        request(
            "r1",
            "2026-12-03T10:00:01Z",
            "agent-a",
            Verb::List,
            "/api/v1/pods",
        ),
        request(
            "r2",
            "2026-12-03T10:00:02Z",
            "agent-a",
            Verb::Create,
            "/api/v1/pods",
        ),
        // A pause longer than the gap starts a new run.
        request(
            "r3",
            "2026-12-03T11:00:00Z",
            "agent-a",
            Verb::Get,
            "/api/v1/pods/x",
        ),
        request(
            "r4",
            "2026-12-03T10:30:00Z",
            "other",
            Verb::Get,
            "/api/v1/pods/y",
        ),
    ];
    let mut exit = frame("exec-1", 1, 1_500_000, FrameEventKind::Exit);
    exit.exit_code = Some(0);
    let mut end = frame("exec-1", 2, 2_000_000, FrameEventKind::End);
    end.detail = Some(r#"{"error":null}"#.into());
    let frames = vec![end, frame("exec-1", 0, 10, FrameEventKind::Frame), exit];

    let all = list_sessions(
        &requests,
        &frames,
        DEFAULT_RUN_GAP,
        &SessionFilter::default(),
    );
    let summary: Vec<(&str, SessionType, usize, &str)> = all
        .iter()
        .map(|s| (s.id.as_str(), s.kind, s.requests, s.outcome.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("exec-1", SessionType::Exec, 1, "exit 0"),
            ("run-exec-1", SessionType::Requests, 3, "3 forwarded"),
            ("run-r4", SessionType::Requests, 1, "1 forwarded"),
            ("run-r3", SessionType::Requests, 1, "1 forwarded"),
        ]
    );
    let exec = &all[0];
    assert_eq!(exec.command.as_deref(), Some("sh -c \"echo hi\""));
    assert_eq!(exec.target.as_deref(), Some("default/web:app"));
    assert_eq!(exec.who, "system:serviceaccount:agents:cursor");
    assert_eq!(exec.duration_ms, 2000);

    let only = |filter: SessionFilter| -> Vec<String> {
        list_sessions(&requests, &frames, DEFAULT_RUN_GAP, &filter)
            .into_iter()
            .map(|s| s.id)
            .collect()
    };
    assert_eq!(
        only(SessionFilter {
            workload: Some("other".into()),
            ..SessionFilter::default()
        }),
        vec!["run-r4"]
    );
    assert_eq!(
        only(SessionFilter {
            kind: Some(SessionType::Exec),
            ..SessionFilter::default()
        }),
        vec!["exec-1"]
    );
    assert_eq!(
        only(SessionFilter {
            since: Some(ts("2026-12-03T10:10:00Z")),
            until: Some(ts("2026-12-03T10:59:00Z")),
            ..SessionFilter::default()
        }),
        vec!["run-r4"]
    );
    assert_eq!(
        only(SessionFilter {
            namespace: Some("elsewhere".into()),
            ..SessionFilter::default()
        }),
        Vec::<String>::new()
    );
    assert_eq!(
        only(SessionFilter {
            workload: Some("agent-*".into()),
            kind: Some(SessionType::Requests),
            ..SessionFilter::default()
        }),
        vec!["run-exec-1", "run-r3"]
    );
}

#[test]
fn a_session_without_its_end_says_so() {
    let frames = vec![frame("s", 0, 5, FrameEventKind::Frame)];
    let all = list_sessions(&[], &frames, DEFAULT_RUN_GAP, &SessionFilter::default());
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].outcome, "open or cut off (no end row)");
    assert_eq!(all[0].who, "unknown");
}
