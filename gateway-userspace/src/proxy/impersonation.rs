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
pub(super) fn impersonation_headers(headers: &mut HeaderMap, as_whom: &Impersonation) {
    let Ok(user) = HeaderValue::from_str(&as_whom.user) else {
        tracing::warn!(user = %as_whom.user, "impersonated user is not a valid header value");
        return;
    };
    headers.insert(HeaderName::from_static("impersonate-user"), user);
    for group in &as_whom.groups {
        if let Ok(g) = HeaderValue::from_str(group) {
            headers.append(HeaderName::from_static("impersonate-group"), g);
        }
    }
    if let Some(uid) = as_whom
        .uid
        .as_deref()
        .and_then(|u| HeaderValue::from_str(u).ok())
    {
        headers.insert(HeaderName::from_static("impersonate-uid"), uid);
    }
}
