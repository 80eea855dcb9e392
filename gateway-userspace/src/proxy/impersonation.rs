//! Whose identity upstream requests run as (`upstream.impersonate`): decided from the
//! kernel-attributed workload or the verified principal, never from the client's headers.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::{
    config::{ImpersonationConfig, ImpersonationMode},
    identity::{
        WorkloadIdentity,
        principal::{Principal, PrincipalKind},
    },
};

/// Who the upstream request runs as, when the gateway impersonates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impersonation {
    /// `Impersonate-User`.
    pub user: String,
    /// `Impersonate-Group`, one header each.
    pub groups: Vec<String>,
    /// `Impersonate-Uid`, when the identity has a known UID.
    pub uid: Option<String>,
}

/// Decides the impersonated identity; an identity that cannot be established is a refusal,
/// never a silent fallback to the gateway's own (broad) identity.
pub(super) fn impersonation(
    cfg: &ImpersonationConfig,
    workload: &WorkloadIdentity,
    principal: &Principal,
) -> Result<Option<Impersonation>, String> {
    match cfg.mode {
        ImpersonationMode::None => Ok(None),
        ImpersonationMode::Fixed => Ok(Some(Impersonation {
            user: cfg.user.clone().unwrap_or_default(),
            groups: cfg.groups.clone(),
            uid: None,
        })),
        ImpersonationMode::Workload => match (&workload.namespace, &workload.service_account, workload.is_known()) {
            (Some(ns), Some(sa), true) => Ok(Some(Impersonation {
                user: format!("system:serviceaccount:{ns}:{sa}"),
                groups: vec!["system:serviceaccounts".to_owned(), format!("system:serviceaccounts:{ns}")],
                uid: None,
            })),
            _ => Err("the gateway impersonates workloads, and this connection's workload is not identified".to_owned()),
        },
        ImpersonationMode::Principal => match (principal.kind, &principal.subject) {
            (PrincipalKind::Oidc | PrincipalKind::ServiceAccount | PrincipalKind::User, Some(subject)) => {
                Ok(Some(Impersonation {
                    user: subject.clone(),
                    groups: principal.groups.clone(),
                    uid: principal.uid.clone(),
                }))
            }
            _ => Err(format!(
                "the gateway impersonates the presented principal, and this request has none it could verify ({})",
                principal.reason.as_deref().unwrap_or(principal.kind.as_str())
            )),
        },
    }
}

/// Writes `Impersonate-User`, one `Impersonate-Group` per group and `Impersonate-Uid`.
/// A name that cannot be a header value (a control character in an OIDC claim) is an
/// error, never left out: without `Impersonate-User` the request would run as the
/// gateway's own identity, and without a group as someone the API server never saw.
pub(super) fn impersonation_headers(
    headers: &mut HeaderMap,
    as_whom: &Impersonation,
) -> Result<(), String> {
    let value = |what: &str, text: &str| {
        // UTF-8 names pass (as obs-text, which the API server accepts); control
        // characters do not.
        HeaderValue::from_bytes(text.as_bytes()).map_err(|_| {
            format!(
                "cannot impersonate {what} {text:?}: it is not a valid HTTP header value, so the request is refused rather than sent as the gateway"
            )
        })
    };
    let user = value("user", &as_whom.user)?;
    let groups = as_whom
        .groups
        .iter()
        .map(|g| value("group", g))
        .collect::<Result<Vec<_>, _>>()?;
    let uid = as_whom
        .uid
        .as_deref()
        .map(|u| value("uid", u))
        .transpose()?;
    headers.insert(HeaderName::from_static("impersonate-user"), user);
    for group in groups {
        headers.append(HeaderName::from_static("impersonate-group"), group);
    }
    if let Some(uid) = uid {
        headers.insert(HeaderName::from_static("impersonate-uid"), uid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::headers::sanitize_request_headers;
    #[test]
    fn credentials_and_impersonation_never_pass() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer pod-token"),
            ("Impersonate-User", "system:admin"),
            ("impersonate-group", "system:masters"),
            ("Impersonate-Extra-scopes", "x"),
            ("proxy-authorization", "Basic x"),
            ("cookie", "session=1"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("host", "169.254.77.100"),
            ("accept", "application/json"),
        ] {
            h.append(
                HeaderName::try_from(k).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        sanitize_request_headers(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            left,
            vec!["accept"],
            "unexpected headers survived: {left:?}"
        );
    }

    #[test]
    fn principal_impersonation_carries_user_groups_and_uid() {
        let cfg = ImpersonationConfig {
            mode: ImpersonationMode::Principal,
            ..ImpersonationConfig::default()
        };
        let mut principal = Principal::anonymous();
        principal.kind = PrincipalKind::ServiceAccount;
        principal.subject = Some("system:serviceaccount:agents:cursor".to_owned());
        principal.groups = vec![
            "system:serviceaccounts".to_owned(),
            "system:authenticated".to_owned(),
        ];
        principal.uid = Some("7c1d0e2a-5b7f-4b0e-9f5d-2f1a8e3c4b6d".to_owned());
        let as_whom = impersonation(&cfg, &WorkloadIdentity::default(), &principal)
            .expect("principal mode with a verified principal")
            .expect("an impersonated identity");
        let mut h = HeaderMap::new();
        impersonation_headers(&mut h, &as_whom).expect("valid names");
        let written: Vec<(&str, &str)> = h
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("<binary>")))
            .collect();
        assert_eq!(
            written,
            [
                ("impersonate-user", "system:serviceaccount:agents:cursor"),
                ("impersonate-group", "system:serviceaccounts"),
                ("impersonate-group", "system:authenticated"),
                ("impersonate-uid", "7c1d0e2a-5b7f-4b0e-9f5d-2f1a8e3c4b6d"),
            ]
        );

        // Without a UID (OIDC, fixed, workload) no Impersonate-Uid is sent.
        principal.uid = None;
        let as_whom = impersonation(&cfg, &WorkloadIdentity::default(), &principal)
            .expect("ok")
            .expect("identity");
        let mut h = HeaderMap::new();
        impersonation_headers(&mut h, &as_whom).expect("valid names");
        assert!(!h.contains_key("impersonate-uid"));

        // A name that cannot be a header value refuses the request, writing nothing.
        let mut h = HeaderMap::new();
        let accented = Impersonation {
            user: "José".to_owned(),
            groups: vec!["équipe".to_owned()],
            uid: None,
        };
        impersonation_headers(&mut h, &accented).expect("UTF-8 names pass");
        assert_eq!(h["impersonate-user"].as_bytes(), "José".as_bytes());
        for (user, group) in [("alice\u{1}", "sre"), ("alice", "sre\n")] {
            let as_whom = Impersonation {
                user: user.to_owned(),
                groups: vec![group.to_owned()],
                uid: None,
            };
            let mut h = HeaderMap::new();
            let why = impersonation_headers(&mut h, &as_whom).expect_err("refused");
            assert!(why.contains("not a valid HTTP header value"), "{why}");
            assert!(h.is_empty(), "{h:?}");
        }
    }
}
