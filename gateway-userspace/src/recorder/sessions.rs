//! Sessions in a recording, for `chaperone sessions`, `replay` and `export`.
//!
//! Two kinds: an **exec session** (an exec, attach or port-forward stream: its
//! `exec_frames` rows joined with the request that opened it) and a **run of requests**
//! (one workload's requests with no pause longer than a gap between them). Everything here
//! is computed from rows already read; nothing touches the disk, so it is tested on rows.

use std::collections::BTreeMap;

use serde::Serialize;

use super::exec_frames::{ExecFrameRecord, FrameEventKind};
use super::schema::{Outcome, RequestRecord};

/// Default pause that ends a workload's run of requests.
pub const DEFAULT_RUN_GAP: std::time::Duration = std::time::Duration::from_secs(300);

/// What kind of session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionType {
    /// `pods/exec`.
    Exec,
    /// `pods/attach`.
    Attach,
    /// `pods/portforward`.
    PortForward,
    /// A workload's run of API requests.
    Requests,
}

impl SessionType {
    /// The name shown and accepted by `--kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionType::Exec => "exec",
            SessionType::Attach => "attach",
            SessionType::PortForward => "portforward",
            SessionType::Requests => "requests",
        }
    }
}

/// One session, as `chaperone sessions` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    /// The id `replay` and `export` take: the exec session's id, or `run-<first audit id>`.
    pub id: String,
    /// exec, attach, portforward or requests.
    pub kind: SessionType,
    /// When it started.
    pub start: jiff::Timestamp,
    /// How long it lasted, in milliseconds.
    pub duration_ms: i64,
    /// Who: the verified principal's subject, else the pod's service account.
    pub who: String,
    /// The calling pod's namespace.
    pub namespace: Option<String>,
    /// The calling pod.
    pub pod: Option<String>,
    /// What it acted on: the exec target `namespace/pod[:container]`, or the namespaces a
    /// run touched.
    pub target: Option<String>,
    /// The exec command line, or a run's kubectl commands.
    pub command: Option<String>,
    /// Requests in the session (1 for an exec session: the one that opened it).
    pub requests: usize,
    /// exit N, error: ..., or a run's counts by outcome.
    pub outcome: String,
    /// The audit id of the opening (or first) request.
    pub audit_id: String,
}

/// Which sessions to list.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Only sessions of pods in this namespace.
    pub namespace: Option<String>,
    /// Only sessions of this workload: a pod name, a pod name prefix followed by `*`, or a
    /// service account.
    pub workload: Option<String>,
    /// Only sessions that started at or after this.
    pub since: Option<jiff::Timestamp>,
    /// Only sessions that started before this.
    pub until: Option<jiff::Timestamp>,
    /// Only sessions of this kind.
    pub kind: Option<SessionType>,
}

impl SessionFilter {
    fn keeps(&self, s: &Session, service_account: Option<&str>) -> bool {
        let workload_ok = self.workload.as_deref().is_none_or(|w| {
            let pod = s.pod.as_deref().unwrap_or("");
            match w.strip_suffix('*') {
                Some(prefix) => pod.starts_with(prefix),
                None => pod == w || service_account == Some(w),
            }
        });
        self.namespace
            .as_deref()
            .is_none_or(|ns| s.namespace.as_deref() == Some(ns))
            && workload_ok
            && self.since.is_none_or(|t| s.start >= t)
            && self.until.is_none_or(|t| s.start < t)
            && self.kind.is_none_or(|k| s.kind == k)
    }
}

/// The exec command line of an exec request (`command=` query parameters, in order).
pub fn exec_command(request_uri: &str) -> Option<String> {
    let query = request_uri.split_once('?')?.1;
    let words: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| {
            if v.is_empty() || v.contains([' ', '\t', '"', '\'']) {
                format!("{v:?}")
            } else {
                v.into_owned()
            }
        })
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

fn container(request_uri: &str) -> Option<String> {
    let query = request_uri.split_once('?')?.1;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.into_owned())
}

fn who(r: &RequestRecord) -> String {
    if let Some(subject) = &r.principal.subject {
        return subject.clone();
    }
    match (&r.workload.namespace, &r.workload.service_account) {
        (Some(ns), Some(sa)) => format!("system:serviceaccount:{ns}:{sa}"),
        _ => r
            .workload
            .command
            .clone()
            .map_or_else(|| "unknown".to_owned(), |c| format!("process {c}")),
    }
}

/// The rows of one exec session, in `seq` order.
pub fn session_frames<'a>(frames: &'a [ExecFrameRecord], id: &str) -> Vec<&'a ExecFrameRecord> {
    let mut rows: Vec<&ExecFrameRecord> = frames.iter().filter(|f| f.session_id == id).collect();
    rows.sort_by_key(|f| f.seq);
    rows
}

fn exec_session(
    id: &str,
    rows: &[&ExecFrameRecord],
    requests: &BTreeMap<&str, &RequestRecord>,
) -> Session {
    let first = rows[0];
    let last = rows[rows.len() - 1];
    let opening = requests.get(first.audit_id.as_str()).copied();
    let end = rows.iter().find(|f| f.event == FrameEventKind::End);
    let exit = rows
        .iter()
        .rev()
        .find_map(|f| f.exit_code.filter(|_| f.event == FrameEventKind::Exit));
    let ended_with: Option<String> = end
        .and_then(|e| e.detail.as_deref())
        .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
    let kind = match opening.map(|r| r.object_ref.subresource.as_str()) {
        Some("attach") => SessionType::Attach,
        Some("portforward") => SessionType::PortForward,
        _ => SessionType::Exec,
    };
    let outcome = match (exit, ended_with, end) {
        (Some(code), None, _) => format!("exit {code}"),
        (Some(code), Some(error), _) => format!("exit {code}; {error}"),
        (None, Some(error), _) => format!("error: {error}"),
        (None, None, Some(_)) => "ended".to_owned(),
        (None, None, None) => "open or cut off (no end row)".to_owned(),
    };
    let start = opening.map_or(first.time, |r| r.request_time);
    Session {
        id: id.to_owned(),
        kind,
        start,
        duration_ms: last.offset_us / 1000,
        who: opening.map_or_else(|| "unknown".to_owned(), who),
        namespace: opening.and_then(|r| r.workload.namespace.clone()),
        pod: opening.and_then(|r| r.workload.pod.clone()),
        target: opening.map(|r| {
            let mut t = format!("{}/{}", r.object_ref.namespace, r.object_ref.name);
            if let Some(c) = container(&r.request_uri) {
                t.push(':');
                t.push_str(&c);
            }
            t
        }),
        command: opening.and_then(|r| exec_command(&r.request_uri)),
        requests: usize::from(opening.is_some()),
        outcome,
        audit_id: first.audit_id.clone(),
    }
}

/// The workload a request is attributed to, for grouping runs.
fn workload_key(r: &RequestRecord) -> String {
    match (&r.workload.pod_uid, &r.workload.namespace, &r.workload.pod) {
        (Some(uid), _, _) => uid.clone(),
        (None, Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => format!("cgroup:{}", r.workload.cgroup_id),
    }
}

fn run_session(rows: &[&RequestRecord]) -> Session {
    let first = rows[0];
    let last_end = rows
        .iter()
        .map(|r| r.response_time.unwrap_or(r.request_time))
        .max()
        .unwrap_or(first.request_time);
    let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
    for r in rows {
        *outcomes.entry(r.outcome.as_str()).or_default() += 1;
    }
    let mut commands: Vec<&str> = Vec::new();
    for r in rows {
        if let Some(c) = r.kubectl_command.as_deref()
            && !commands.contains(&c)
        {
            commands.push(c);
        }
    }
    let mut namespaces: Vec<&str> = Vec::new();
    for r in rows {
        let ns = r.object_ref.namespace.as_str();
        if !ns.is_empty() && !namespaces.contains(&ns) {
            namespaces.push(ns);
        }
    }
    let duration = last_end.duration_since(first.request_time);
    Session {
        id: format!("run-{}", first.audit_id),
        kind: SessionType::Requests,
        start: first.request_time,
        duration_ms: i64::try_from(duration.as_millis()).unwrap_or(i64::MAX),
        who: who(first),
        namespace: first.workload.namespace.clone(),
        pod: first.workload.pod.clone(),
        target: (!namespaces.is_empty()).then(|| namespaces.join(",")),
        command: (!commands.is_empty()).then(|| commands.join(", ")),
        requests: rows.len(),
        outcome: outcomes
            .iter()
            .map(|(o, n)| format!("{n} {o}"))
            .collect::<Vec<_>>()
            .join(", "),
        audit_id: first.audit_id.clone(),
    }
}

/// Every session in `requests` and `frames`, filtered, ordered by start time.
pub fn list_sessions(
    requests: &[RequestRecord],
    frames: &[ExecFrameRecord],
    gap: std::time::Duration,
    filter: &SessionFilter,
) -> Vec<Session> {
    let by_audit: BTreeMap<&str, &RequestRecord> =
        requests.iter().map(|r| (r.audit_id.as_str(), r)).collect();
    let mut frames_by_session: BTreeMap<&str, Vec<&ExecFrameRecord>> = BTreeMap::new();
    for f in frames {
        frames_by_session
            .entry(f.session_id.as_str())
            .or_default()
            .push(f);
    }
    let mut out = Vec::new();
    for (id, mut rows) in frames_by_session {
        rows.sort_by_key(|f| f.seq);
        let session = exec_session(id, &rows, &by_audit);
        let sa = by_audit
            .get(session.audit_id.as_str())
            .and_then(|r| r.workload.service_account.as_deref());
        if filter.keeps(&session, sa) {
            out.push(session);
        }
    }
    // Runs: each workload's requests, split where it paused longer than `gap`.
    let mut by_workload: BTreeMap<String, Vec<&RequestRecord>> = BTreeMap::new();
    for r in requests {
        by_workload.entry(workload_key(r)).or_default().push(r);
    }
    let gap = jiff::SignedDuration::try_from(gap).unwrap_or(jiff::SignedDuration::MAX);
    for (_, mut rows) in by_workload {
        rows.sort_by_key(|r| r.request_time);
        let mut start = 0;
        for i in 1..=rows.len() {
            let split = i == rows.len()
                || rows[i]
                    .request_time
                    .duration_since(rows[i - 1].request_time)
                    > gap;
            if split {
                let run = run_session(&rows[start..i]);
                if filter.keeps(&run, rows[start].workload.service_account.as_deref()) {
                    out.push(run);
                }
                start = i;
            }
        }
    }
    out.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
    out
}

/// The requests a run session is made of, or the requests around an exec session: by the
/// same workload, from its start to its end (the opening request excluded).
pub fn requests_during<'a>(
    requests: &'a [RequestRecord],
    opening: &RequestRecord,
    end: jiff::Timestamp,
) -> Vec<&'a RequestRecord> {
    let key = workload_key(opening);
    let mut rows: Vec<&RequestRecord> = requests
        .iter()
        .filter(|r| r.audit_id != opening.audit_id && workload_key(r) == key)
        .filter(|r| r.request_time >= opening.request_time && r.request_time <= end)
        .collect();
    rows.sort_by_key(|r| r.request_time);
    rows
}

/// One request as a line in a replay.
pub fn request_line(r: &RequestRecord) -> String {
    let time = jiff::tz::Offset::UTC
        .to_datetime(r.request_time)
        .strftime("%H:%M:%S%.3f");
    let object = [
        r.object_ref.resource.as_str(),
        r.object_ref.namespace.as_str(),
        r.object_ref.name.as_str(),
    ]
    .iter()
    .filter(|p| !p.is_empty())
    .copied()
    .collect::<Vec<_>>()
    .join(" ");
    let decided = match r.outcome {
        Outcome::Forwarded => format!("{}", r.response_code),
        other => format!("{} {other}", r.response_code),
    };
    format!(
        "[chaperone {time}] {} {object} -> {decided}",
        r.verb.as_str()
    )
}

#[cfg(test)]
#[path = "sessions_tests.rs"]
mod tests;
