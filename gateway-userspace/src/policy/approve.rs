//! The `approve` effect: a rule whose requests wait for a person (see
//! [`crate::approval`]), and the built-in rule that keeps agents away from the approval
//! machinery.
//!
//! ```yaml
//! - name: scale-prod
//!   action: approve
//!   verbs: [patch, update]
//!   resources: [deployments/scale, deployments]
//!   namespaces: [prod]
//!   approval:
//!     approvers: {groups: [sre], users: [alice]}   # required: someone must be able to decide
//!     timeout: 5m                                  # default 5m; silence until then = denied
//!     grant: {for: 15m, scope: identical}          # or `once` (the default)
//!     mode: hold                                   # hold (default) | async
//! ```

use std::time::Duration;

use super::*;
use crate::approval::resource::{Approvers, GrantScope};

/// The timeout when the rule sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The longest timeout accepted (a held connection is a resource).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The longest lasting grant accepted.
pub const MAX_GRANT: Duration = Duration::from_secs(7 * 24 * 3600);
/// [`Decision::rule`] of the built-in rule that protects the approval machinery.
pub const BUILTIN_PROTECT_APPROVALS: &str = "builtin.protect-approvals";
/// Rule names with this prefix are reserved for built-in rules.
pub(super) const BUILTIN_PREFIX: &str = "builtin.";
/// The API group of Chaperone's own resources, which agents may not write.
pub const PROTECTED_GROUP: &str = crate::approval::resource::GROUP;
/// The Service in front of the gateways' approvals API (deploy/approvals.yaml); agents
/// may not reach it through the API server's service proxy.
pub const APPROVALS_SERVICE: &str = "chaperone-approvals";

/// How the agent's request waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalMode {
    /// The request stays open, nothing is sent upstream until a decision.
    #[default]
    Hold,
    /// The request is answered at once with a 403 naming the AccessRequest; a retry
    /// passes once it is approved.
    Async,
}

impl ApprovalMode {
    /// As policy files spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalMode::Hold => "hold",
            ApprovalMode::Async => "async",
        }
    }
}

/// What an approval lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantSpec {
    /// This request only.
    Once,
    /// Matching requests from the same workload until the duration has passed.
    For {
        /// How long.
        duration: Duration,
        /// Which requests.
        scope: GrantScope,
    },
}

/// A rule's `approval:` block, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// Who may decide.
    pub approvers: Approvers,
    /// How long a request waits before silence becomes a denial.
    pub timeout: Duration,
    /// What an approval grants.
    pub grant: GrantSpec,
    /// Whether the request is held or answered at once.
    pub mode: ApprovalMode,
}

fn duration(text: &str) -> Result<Duration, String> {
    let signed: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|e| format!("'{text}' is not a duration such as 30s, 5m or 1h: {e}"))?;
    Duration::try_from(signed)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("'{text}' must be a positive duration"))
}

/// Compiles a rule's `approval` block: required with `action: approve`, refused otherwise.
pub(super) fn compile(
    rule: &RawRule,
    at: &dyn Fn(&[Seg]) -> Vec<Seg>,
) -> Result<Option<Arc<Approval>>, InvalidAt> {
    let Some(raw) = &rule.approval else {
        if rule.action == Action::Approve {
            return Err(invalid(
                at(&[Seg::Key("action")]),
                "action: approve needs an approval block naming the approvers, e.g. approval: {approvers: {groups: [sre]}}",
            ));
        }
        return Ok(None);
    };
    if rule.action != Action::Approve {
        return Err(invalid(
            at(&[Seg::Key("approval")]),
            format!(
                "approval settings apply to rules with action: approve, not {}",
                rule.action
            ),
        ));
    }
    let here = |rest: &[Seg]| {
        let mut path = vec![Seg::Key("approval")];
        path.extend_from_slice(rest);
        at(&path)
    };
    let approvers = match &raw.approvers {
        None => {
            return Err(invalid(
                here(&[]),
                "approvers: names nobody, so no request could ever be approved; list groups or users",
            ));
        }
        Some(a) if !(a.groups.is_empty() && a.users.is_empty()) => {
            for (key, list) in [("groups", &a.groups), ("users", &a.users)] {
                if let Some(j) = list.iter().position(|x| x.trim().is_empty()) {
                    return Err(invalid(
                        here(&[Seg::Key("approvers"), Seg::Key(key), Seg::Index(j)]),
                        "must not be empty",
                    ));
                }
            }
            Approvers {
                groups: a.groups.clone(),
                users: a.users.clone(),
            }
        }
        _ => {
            return Err(invalid(
                here(&[Seg::Key("approvers")]),
                "names nobody, so no request could ever be approved; list groups or users",
            ));
        }
    };
    let timeout = match &raw.timeout {
        None => DEFAULT_TIMEOUT,
        Some(text) => {
            let d = duration(text).map_err(|m| invalid(here(&[Seg::Key("timeout")]), m))?;
            if d > MAX_TIMEOUT {
                return Err(invalid(
                    here(&[Seg::Key("timeout")]),
                    format!("'{text}' is longer than the maximum of 24h"),
                ));
            }
            d
        }
    };
    let grant = match &raw.grant {
        None => GrantSpec::Once,
        Some(RawGrant::Word(w)) if w == "once" => GrantSpec::Once,
        Some(RawGrant::Word(w)) => {
            return Err(invalid(
                here(&[Seg::Key("grant")]),
                format!(
                    "unknown grant '{w}'; write `once` or a mapping such as {{for: 15m, scope: identical}}"
                ),
            ));
        }
        Some(RawGrant::Lasting(l)) => {
            let d = duration(&l.duration)
                .map_err(|m| invalid(here(&[Seg::Key("grant"), Seg::Key("for")]), m))?;
            if d > MAX_GRANT {
                return Err(invalid(
                    here(&[Seg::Key("grant"), Seg::Key("for")]),
                    format!("'{}' is longer than the maximum of 7 days", l.duration),
                ));
            }
            let scope = match l.scope.as_deref() {
                None | Some("identical") => GrantScope::Identical,
                Some("rule") => GrantScope::Rule,
                Some(other) => {
                    return Err(invalid(
                        here(&[Seg::Key("grant"), Seg::Key("scope")]),
                        format!("unknown scope '{other}'; write identical or rule"),
                    ));
                }
            };
            GrantSpec::For { duration: d, scope }
        }
    };
    if rule.message.is_some() {
        return Err(invalid(
            at(&[Seg::Key("message")]),
            "an approve rule takes no message: the client is told about the AccessRequest and the approver's comment",
        ));
    }
    Ok(Some(Arc::new(Approval {
        approvers,
        timeout,
        grant,
        mode: raw.mode.unwrap_or_default(),
    })))
}

/// The built-in rule no policy can remove: agents may not write `chaperone.dev` resources
/// (an AccessRequest's status is where a decision lives) nor reach the approvals API
/// through the API server's service proxy. (A direct connection to the approvals API is
/// refused by the API itself: it authenticates approvers and refuses intercepted pods.)
pub(super) fn builtin(request: &RequestInfo) -> Option<Decision> {
    if !request.is_resource_request {
        return None;
    }
    let message = if request.api_group == PROTECTED_GROUP && request.is_mutating() {
        "agents may not write Chaperone's own resources (chaperone.dev): approvals are decided by people, through the approvals API"
    } else if request.api_group.is_empty()
        && request.resource == "services"
        && request.subresource == "proxy"
        && service_proxy_target(&request.name) == APPROVALS_SERVICE
    {
        "agents may not use the approvals API"
    } else {
        return None;
    };
    Some(Decision {
        action: Action::Deny,
        rule: Some(Arc::from(BUILTIN_PROTECT_APPROVALS)),
        message: Some(Arc::from(message)),
        masking: None,
        stdin_lines: None,
        approval: None,
    })
}

/// The Service name of a service proxy path's name segment: `name`, `name:port`,
/// `https:name:port` or `https:name:`.
fn service_proxy_target(segment: &str) -> &str {
    let parts: Vec<&str> = segment.split(':').collect();
    match parts.as_slice() {
        [name] | [name, _] if !matches!(*name, "http" | "https") => name,
        [_scheme, name, ..] => name,
        _ => segment,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Uri};

    const HEADER: &str =
        "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n";

    fn load(rules: &str) -> Result<Policy, String> {
        Policy::from_yaml(&format!("{HEADER}{rules}"), "policy.yaml").map_err(|e| e.to_string())
    }

    fn decision(p: &Policy, method: &str, uri: &str) -> Decision {
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let uri: Uri = uri.parse().expect("uri");
        let info = RequestInfo::parse(&method, &uri).expect("request");
        decide(p, &RequestContext::new(&info))
    }

    const SCALE: &str = "  - name: scale-prod\n    action: approve\n    verbs: [patch, update]\n    resources: [deployments, deployments/scale]\n    namespaces: [prod]\n";

    #[test]
    fn approve_rules_carry_their_approval() {
        let p = load(&format!(
            "{SCALE}    approval:\n      approvers: {{groups: [sre], users: [alice]}}\n      timeout: 2m\n      grant: {{for: 15m, scope: rule}}\n      mode: async\n"
        ))
        .expect("loads");
        let d = decision(
            &p,
            "PATCH",
            "/apis/apps/v1/namespaces/prod/deployments/web/scale",
        );
        assert_eq!(d.action, Action::Approve);
        assert!(!d.is_allowed());
        assert_eq!(d.rule.as_deref(), Some("scale-prod"));
        let a = d.approval.clone().expect("approval");
        assert_eq!(a.approvers.groups, ["sre"]);
        assert_eq!(a.approvers.users, ["alice"]);
        assert_eq!(a.timeout, Duration::from_secs(120));
        assert_eq!(
            a.grant,
            GrantSpec::For {
                duration: Duration::from_secs(900),
                scope: GrantScope::Rule
            }
        );
        assert_eq!(a.mode, ApprovalMode::Async);
        assert!(
            d.reason()
                .starts_with("held for approval by Chaperone policy rule")
        );
        // Elsewhere the default applies, with no approval attached.
        let other = decision(&p, "PATCH", "/apis/apps/v1/namespaces/dev/deployments/web");
        assert_eq!(
            (other.action, other.approval.is_none()),
            (Action::Allow, true)
        );
    }

    #[test]
    fn approval_defaults() {
        let p = load(&format!(
            "{SCALE}    approval: {{approvers: {{groups: [sre]}}}}\n"
        ))
        .expect("loads");
        let a = decision(&p, "PATCH", "/apis/apps/v1/namespaces/prod/deployments/web")
            .approval
            .expect("approval");
        assert_eq!(
            (a.timeout, a.grant, a.mode),
            (DEFAULT_TIMEOUT, GrantSpec::Once, ApprovalMode::Hold)
        );
        let once = load(&format!(
            "{SCALE}    approval: {{approvers: {{users: [bob]}}, grant: once}}\n"
        ))
        .expect("loads");
        let a = decision(
            &once,
            "PATCH",
            "/apis/apps/v1/namespaces/prod/deployments/web",
        )
        .approval
        .expect("approval");
        assert_eq!(a.grant, GrantSpec::Once);
    }

    #[test]
    fn approved_requests_are_masked_like_allowed_ones() {
        let p = load(&format!(
            "  - name: mask-all\n    action: mask\n    verbs: [\"*\"]\n    resources: [\"*\"]\n{SCALE}    approval: {{approvers: {{groups: [sre]}}}}\n"
        ))
        .expect("loads");
        let d = decision(&p, "PATCH", "/apis/apps/v1/namespaces/prod/deployments/web");
        assert_eq!(d.action, Action::Approve);
        assert!(d.masking.is_some());
    }

    #[test]
    fn approval_load_errors_are_located() {
        let cases = [
            (SCALE.to_owned(), "policy.yaml:6:13: rules[0].action: action: approve needs an approval block"),
            (format!("{SCALE}    approval: {{}}\n"), "rules[0].approval: approvers: names nobody"),
            (format!("{SCALE}    approval: {{approvers: {{groups: [sre]}}, timeout: soon}}\n"), "rules[0].approval.timeout: 'soon' is not a duration"),
            (format!("{SCALE}    approval: {{approvers: {{groups: [sre]}}, timeout: 48h}}\n"), "rules[0].approval.timeout: '48h' is longer than the maximum of 24h"),
            (format!("{SCALE}    approval: {{approvers: {{groups: [sre]}}, grant: twice}}\n"), "rules[0].approval.grant: unknown grant 'twice'"),
            (format!("{SCALE}    approval: {{approvers: {{groups: [sre]}}, grant: {{for: 15m, scope: cluster}}}}\n"), "rules[0].approval.grant.scope: unknown scope 'cluster'"),
            (format!("{SCALE}    approval: {{approvers: {{groups: [sre]}}, mode: later}}\n"), "rules[0].approval.mode: unknown variant 'later', expected 'hold' or 'async'"),
            (format!("{SCALE}    approval: {{approvers: {{groups: [sre]}}, wait: 1m}}\n"), "rules[0].approval: unknown field 'wait'"),
            ("  - name: a\n    action: deny\n    verbs: [get]\n    resources: [pods]\n    approval: {approvers: {groups: [sre]}}\n".to_owned(), "rules[0].approval: approval settings apply to rules with action: approve, not deny"),
            ("  - name: builtin.x\n    action: deny\n    verbs: [get]\n    resources: [pods]\n".to_owned(), "rules[0].name: rule name 'builtin.x' starts with 'builtin.'"),
        ];
        for (rules, want) in cases {
            let err = load(&rules).expect_err(&rules);
            assert!(err.contains(want), "want {want:?}\n got {err:?}");
            // Located: file, line and column.
            let mut parts = err.splitn(4, ':');
            assert_eq!(parts.next(), Some("policy.yaml"), "{err}");
            assert!(
                parts.next().is_some_and(|l| l.parse::<usize>().is_ok())
                    && parts.next().is_some_and(|c| c.parse::<usize>().is_ok()),
                "not located: {err}"
            );
        }
        let err = Policy::from_yaml(
            "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: approve\n",
            "policy.yaml",
        )
        .expect_err("approve is no default")
        .to_string();
        assert!(err.contains("default: default is allow or deny"), "{err}");
    }

    #[test]
    fn the_builtin_rule_cannot_be_overridden() {
        let p = load(
            "  - name: allow-all\n    action: allow\n    verbs: [\"*\"]\n    resources: [\"*\"]\n",
        )
        .expect("loads");
        let ars = "/apis/chaperone.dev/v1alpha1/namespaces/chaperone-system/accessrequests";
        for (method, uri) in [
            ("POST", ars.to_owned()),
            ("PATCH", format!("{ars}/ar-1/status")),
            ("PUT", format!("{ars}/ar-1/status")),
            ("DELETE", format!("{ars}/ar-1")),
            ("DELETE", ars.to_owned()),
            ("GET", "/api/v1/namespaces/chaperone-system/services/chaperone-approvals/proxy/".to_owned()),
            ("POST", "/api/v1/namespaces/chaperone-system/services/https:chaperone-approvals:443/proxy/v1/approve".to_owned()),
        ] {
            let d = decision(&p, method, &uri);
            assert_eq!(
                (d.action, d.rule.as_deref()),
                (Action::Deny, Some(BUILTIN_PROTECT_APPROVALS)),
                "{method} {uri}"
            );
            assert!(d.reason().starts_with("denied by Chaperone policy built-in rule"), "{}", d.reason());
        }
        // Reading requests, and other services' proxies, are the policy's business.
        for (method, uri) in [
            ("GET", format!("{ars}/ar-1")),
            ("GET", ars.to_owned()),
            (
                "GET",
                "/api/v1/namespaces/default/services/web:80/proxy/".to_owned(),
            ),
        ] {
            assert_eq!(
                decision(&p, method, &uri).action,
                Action::Allow,
                "{method} {uri}"
            );
        }
    }

    #[test]
    fn service_proxy_names() {
        for (segment, want) in [
            ("chaperone-approvals", "chaperone-approvals"),
            ("chaperone-approvals:443", "chaperone-approvals"),
            ("chaperone-approvals:https", "chaperone-approvals"),
            ("https:chaperone-approvals:443", "chaperone-approvals"),
            ("https:chaperone-approvals:", "chaperone-approvals"),
            ("web:80", "web"),
        ] {
            assert_eq!(service_proxy_target(segment), want, "{segment}");
        }
    }
}
