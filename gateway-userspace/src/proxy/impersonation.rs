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
/// never a silent fallback to the gateway's own (broad) identity. So is one whose names
/// cannot be sent as headers (a control character in an OIDC claim): the request is denied
/// here, with the reason, rather than failing later as if the credential were unavailable.
pub(super) fn impersonation(
    cfg: &ImpersonationConfig,
    workload: &WorkloadIdentity,
    principal: &Principal,
) -> Result<Option<Impersonation>, String> {
    let as_whom = match cfg.mode {
        ImpersonationMode::None => return Ok(None),
        ImpersonationMode::Fixed => Impersonation {
            user: cfg.user.clone().unwrap_or_default(),
            groups: cfg.groups.clone(),
            uid: None,
        },
        ImpersonationMode::Workload => match (&workload.namespace, &workload.service_account, workload.is_known()) {
            (Some(ns), Some(sa), true) => Impersonation {
                user: format!("system:serviceaccount:{ns}:{sa}"),
                groups: vec!["system:serviceaccounts".to_owned(), format!("system:serviceaccounts:{ns}")],
                uid: None,
            },
            _ => return Err("the gateway impersonates workloads, and this connection's workload is not identified".to_owned()),
        },
        ImpersonationMode::Principal => match (principal.kind, &principal.subject) {
            (PrincipalKind::Oidc | PrincipalKind::ServiceAccount | PrincipalKind::User, Some(subject)) => {
                Impersonation {
                    user: subject.clone(),
                    groups: principal.groups.clone(),
                    uid: principal.uid.clone(),
                }
            }
            _ => return Err(format!(
                "the gateway impersonates the presented principal, and this request has none it could verify ({})",
                principal.reason.as_deref().unwrap_or(principal.kind.as_str())
            )),
        },
    };
    as_whom.check_names()?;
    Ok(Some(as_whom))
}

impl Impersonation {
    /// Every name, with what it is.
    fn names(&self) -> impl Iterator<Item = (&'static str, &str)> {
        std::iter::once(("user", self.user.as_str()))
            .chain(self.groups.iter().map(|g| ("group", g.as_str())))
            .chain(self.uid.iter().map(|u| ("uid", u.as_str())))
    }

    /// Whether every name can be a header value, without building one (the credential
    /// step builds them once the request is allowed).
    fn check_names(&self) -> Result<(), String> {
        match self.names().find(|(_, text)| !is_header_value(text)) {
            Some((what, text)) => Err(not_a_header_value(what, text)),
            None => Ok(()),
        }
    }
}

/// `HeaderValue::from_bytes`'s rule: visible ASCII, space, tab and obs-text (so UTF-8 names,
/// which the API server accepts, pass); no other control character.
fn is_header_value(text: &str) -> bool {
    text.bytes().all(|b| b == b'\t' || (b >= b' ' && b != 0x7f))
}

fn not_a_header_value(what: &str, text: &str) -> String {
    format!(
        "cannot impersonate {what} {text:?}: it is not a valid HTTP header value, so the request is refused rather than sent as the gateway"
    )
}

/// Writes `Impersonate-User`, one `Impersonate-Group` per group and `Impersonate-Uid`.
/// A name that cannot be a header value is an error, never left out: without
/// `Impersonate-User` the request would run as the gateway's own identity, and without a
/// group as someone the API server never saw. ([`impersonation`] already refused such a
/// name; this holds for any caller.)
pub(super) fn impersonation_headers(
    headers: &mut HeaderMap,
    as_whom: &Impersonation,
) -> Result<(), String> {
    let value = |what: &str, text: &str| {
        HeaderValue::from_bytes(text.as_bytes()).map_err(|_| not_a_header_value(what, text))
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

    /// The decision's byte check and the header values the credential step builds agree on
    /// every byte, so nothing the decision let through fails later.
    #[test]
    fn the_name_check_agrees_with_header_values_on_every_byte() {
        for b in 0..=255u8 {
            let text = String::from_utf8_lossy(&[b'a', b, b'z']).into_owned();
            assert_eq!(
                is_header_value(&text),
                HeaderValue::from_bytes(text.as_bytes()).is_ok(),
                "byte {b:#04x}"
            );
        }
    }

    /// A verified principal whose subject, group or UID cannot travel as a header is
    /// refused when the identity is decided (the handler answers 403 and records why), not
    /// when the credential is put on (which answers 503, as if the gateway were broken).
    #[test]
    fn a_principal_whose_names_cannot_be_headers_is_refused_at_the_decision() {
        let cfg = ImpersonationConfig {
            mode: ImpersonationMode::Principal,
            ..ImpersonationConfig::default()
        };
        let verified = |subject: &str, group: &str, uid: &str| {
            let mut principal = Principal::anonymous();
            principal.kind = PrincipalKind::Oidc;
            principal.subject = Some(subject.to_owned());
            principal.groups = vec![group.to_owned()];
            principal.uid = Some(uid.to_owned());
            principal
        };
        let ok = impersonation(
            &cfg,
            &WorkloadIdentity::default(),
            &verified("José", "sre", "1"),
        )
        .expect("a UTF-8 subject is a valid header value");
        assert_eq!(ok.expect("an identity").user, "José");
        for (principal, named) in [
            (
                verified("alice\r\nimpersonate-group: system:masters", "sre", "1"),
                "user",
            ),
            (verified("alice", "sre\u{0}", "1"), "group"),
            (verified("alice", "sre", "1\n"), "uid"),
        ] {
            let why =
                impersonation(&cfg, &WorkloadIdentity::default(), &principal).expect_err("refused");
            assert!(
                why.starts_with(&format!("cannot impersonate {named} ")),
                "{why}"
            );
        }
    }
}
