//! `chaperone policy test`: decides requests written as YAML fixtures, without a cluster,
//! so policy authors can check a policy in CI.
//!
//! ```yaml
//! requests:                       # or one request as the whole document
//!   - name: privileged pod        # optional label for the output
//!     method: POST                # HTTP method
//!     path: /api/v1/namespaces/ai-sandbox/pods   # path and query, as a client sends it
//!     workload:                   # optional: the calling pod (absent = unidentified)
//!       namespace: ai-agents
//!       name: cursor-0
//!       serviceAccount: cursor
//!       labels: {app: cursor}
//!     principal:                  # optional: the verified token (absent = anonymous)
//!       kind: oidc                # anonymous | oidc | serviceAccount | user | invalid
//!       username: alice@example.com
//!       groups: [sre]
//!     object: {...}               # CEL `object`: the body of a create or update, or what a
//!                                 # patch would store (the gateway dry-runs it live)
//!     oldObject: {...}            # CEL `oldObject`: the stored object
//!     expect: deny                # optional: allow | mask | deny (allow passes mask too)
//! ```
//!
//! A request passes when its decision equals `expect`, or, without `expect`, when it is
//! allowed; `chaperone policy test` exits non-zero when any request does not pass.

use std::{collections::BTreeMap, path::Path};

use http::{Method, Uri};
use serde::Deserialize;
use serde_json::Value;

use super::{Action, Content, Decision, Evaluation, Policy, RequestContext, evaluate};
use crate::{
    identity::{
        WorkloadIdentity,
        principal::{Principal, PrincipalKind},
    },
    request::{ExecRequest, RequestInfo},
};

/// A fixture file with several requests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Many {
    requests: Vec<Fixture>,
}

/// One request to decide.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fixture {
    /// A label for the output.
    #[serde(default)]
    pub name: Option<String>,
    /// The HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The calling pod.
    #[serde(default)]
    pub workload: Option<FixtureWorkload>,
    /// The verified principal.
    #[serde(default)]
    pub principal: Option<FixturePrincipal>,
    /// CEL `object`.
    #[serde(default)]
    pub object: Option<Value>,
    /// CEL `oldObject`.
    #[serde(default)]
    pub old_object: Option<Value>,
    /// The expected action.
    #[serde(default)]
    pub expect: Option<Action>,
}

/// The calling pod of a fixture.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FixtureWorkload {
    /// Its namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Its service account (default `default`).
    #[serde(default)]
    pub service_account: Option<String>,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The verified principal of a fixture.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FixturePrincipal {
    /// `anonymous`, `oidc`, `serviceAccount`, `user` or `invalid`.
    pub kind: String,
    /// The user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Its groups.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The decision for one fixture request.
#[derive(Debug)]
pub struct Outcome {
    /// The fixture's label (or `METHOD path`).
    pub label: String,
    /// The decision.
    pub decision: Decision,
    /// Whether a condition failed to evaluate (the decision is then a denial).
    pub condition_failed: bool,
    /// Whether the request passes (see the module docs).
    pub passed: bool,
    /// What was expected, if the fixture said.
    pub expected: Option<Action>,
}

/// Reads a fixture file: one request or `requests:`; errors name the file and the key.
pub fn load(path: &Path) -> Result<Vec<Fixture>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let located = |e: serde_path_to_error::Error<serde_norway::Error>| {
        let at = e.path().to_string();
        format!("{}: {at}: {}", path.display(), e.into_inner())
    };
    // One request, or several under `requests:`; parsed as the form it claims to be, so
    // that an unknown key is named rather than "matches no form".
    let many = text
        .lines()
        .any(|l| l.trim_end() == "requests:" || l.starts_with("requests:"));
    let de = serde_norway::Deserializer::from_str(&text);
    if many {
        let file: Many = serde_path_to_error::deserialize(de).map_err(located)?;
        Ok(file.requests)
    } else {
        let one: Fixture = serde_path_to_error::deserialize(de).map_err(located)?;
        Ok(vec![one])
    }
}

/// Decides one fixture request with `policy`.
pub fn decide_fixture(policy: &Policy, f: &Fixture) -> Result<Outcome, String> {
    let method = Method::from_bytes(f.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("invalid method '{}'", f.method))?;
    let uri: Uri = f
        .path
        .parse()
        .map_err(|e| format!("invalid path '{}': {e}", f.path))?;
    let info = RequestInfo::parse(&method, &uri).map_err(|e| format!("{}: {e}", f.path))?;
    let workload = f.workload.as_ref().map(|w| WorkloadIdentity {
        namespace: Some(w.namespace.clone()),
        pod: Some(w.name.clone()),
        pod_uid: Some(format!("fixture-{}", w.name)),
        service_account: Some(
            w.service_account
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
        ),
        labels: w.labels.clone(),
        ..Default::default()
    });
    let principal = f
        .principal
        .as_ref()
        .map(|p| {
            let kind = match p.kind.as_str() {
                "anonymous" => PrincipalKind::Anonymous,
                "oidc" => PrincipalKind::Oidc,
                "serviceAccount" => PrincipalKind::ServiceAccount,
                "user" => PrincipalKind::User,
                "invalid" => PrincipalKind::Invalid,
                other => {
                    return Err(format!(
                        "unknown principal kind '{other}'; one of anonymous, oidc, serviceAccount, user, invalid"
                    ));
                }
            };
            let mut principal = Principal::anonymous();
            principal.kind = kind;
            principal.subject = p.username.clone();
            principal.groups = p.groups.clone();
            if kind == PrincipalKind::Invalid {
                principal.reason = Some("the fixture says the token is invalid".to_owned());
            }
            Ok(principal)
        })
        .transpose()?;
    let exec =
        matches!(info.subresource.as_str(), "exec" | "attach").then(|| ExecRequest::from_uri(&uri));
    let dry_run = uri.query().is_some_and(|q| q.contains("dryRun="));
    let missing = "the fixture gives no object for this request";
    fn content<'a>(v: &'a Option<Value>, missing: &'a str) -> Content<'a> {
        match v {
            Some(v) => Content::Known(v),
            None => Content::Unavailable(missing),
        }
    }
    let object = match (&f.object, info.verb) {
        (
            None,
            crate::request::Verb::Get
            | crate::request::Verb::List
            | crate::request::Verb::Watch
            | crate::request::Verb::Delete,
        ) => Content::Absent,
        _ => content(&f.object, missing),
    };
    let old_object = match (&f.old_object, info.verb) {
        (None, crate::request::Verb::Create) => Content::Absent,
        (
            None,
            crate::request::Verb::Update
            | crate::request::Verb::Patch
            | crate::request::Verb::Delete,
        ) => content(&f.old_object, missing),
        (None, _) => Content::Absent,
        (Some(v), _) => Content::Known(v),
    };
    let ctx = RequestContext::new(&info)
        .with_workload(workload.as_ref())
        .with_principal(principal.as_ref())
        .with_exec(exec.as_ref(), dry_run)
        .with_content(object, old_object);
    let (decision, condition_failed) = match evaluate(policy, &ctx) {
        Evaluation::Decided(d) => (d, false),
        Evaluation::ConditionFailed(d) => (d, true),
        Evaluation::NeedsContent { .. } => (super::decide(policy, &ctx), true),
    };
    let passed = match f.expect {
        // A masked request is an allowed one.
        Some(Action::Allow) => decision.is_allowed(),
        Some(want) => decision.action == want,
        None => decision.is_allowed(),
    };
    Ok(Outcome {
        label: f
            .name
            .clone()
            .unwrap_or_else(|| format!("{} {}", f.method, f.path)),
        decision,
        condition_failed,
        passed,
        expected: f.expect,
    })
}
