//! Who is asking, and what the test server would let them do.
//!
//! Identities follow the API server's authentication and impersonation filters
//! (`apiserver/pkg/authentication/group`, `pkg/endpoints/filters/impersonation.go`):
//! `system:authenticated` is added to every authenticated user, a service account
//! impersonated without groups gets its two service-account groups, and
//! `Impersonate-Group`/`-Uid`/`-Extra-*` without `Impersonate-User` is an error.
//!
//! The [`Authorizer`] is deliberately small: everyone may do everything except what a
//! [`Denial`] forbids, like an RBAC `cluster-admin` binding behind a deny-first webhook.
//! It answers the access reviews (`kubectl auth can-i`) and gates requests to the `scale`
//! subresource (see `scale`); the server's other requests are served whoever sends them.

use std::collections::BTreeMap;

use http::HeaderMap;

/// Added to every authenticated identity.
pub(crate) const AUTHENTICATED: &str = "system:authenticated";
/// The group of the anonymous user.
pub(crate) const UNAUTHENTICATED: &str = "system:unauthenticated";
/// The user of a request that carries no credential, when authentication is off.
pub(crate) const ANONYMOUS: &str = "system:anonymous";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const EXTRA_HEADER_PREFIX: &str = "impersonate-extra-";

/// An identity as the API server's `user.Info`: what `kubectl auth whoami` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    /// User name (`system:serviceaccount:<ns>:<name>` for service accounts).
    pub username: String,
    /// UID; empty when none is known.
    pub uid: String,
    /// Groups, in order.
    pub groups: Vec<String>,
    /// Extra attributes, e.g. `authentication.kubernetes.io/pod-name`.
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// A user with these groups (the server appends `system:authenticated` itself).
    pub fn new<I, S>(username: impl Into<String>, groups: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            username: username.into(),
            groups: groups.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// What a token of service account `namespace/name` authenticates as.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self::new(
            format!("{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}"),
            service_account_groups(namespace),
        )
    }

    /// A bearer token in `tokens` with no configured user: a cluster administrator, as
    /// kubeadm's admin credential.
    pub(crate) fn admin() -> Self {
        Self::new("system:admin", ["system:masters"])
    }

    /// A request without credentials on a server that does not authenticate.
    pub(crate) fn anonymous() -> Self {
        Self::new(ANONYMOUS, [UNAUTHENTICATED])
    }

    /// `AuthenticatedGroupAdder`: `system:authenticated` is appended unless the user is
    /// anonymous or already in it (or in `system:unauthenticated`).
    pub(crate) fn with_authenticated_group(mut self) -> Self {
        let marked = self
            .groups
            .iter()
            .any(|g| g == AUTHENTICATED || g == UNAUTHENTICATED);
        if self.username != ANONYMOUS && !marked {
            self.groups.push(AUTHENTICATED.to_owned());
        }
        self
    }
}

fn service_account_groups(namespace: &str) -> [String; 2] {
    [
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{namespace}"),
    ]
}

/// `serviceaccount.SplitUsername`: the namespace and name of a service-account user name.
fn split_service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
    let (namespace, name) = rest.split_once(':')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then_some((namespace, name))
}

/// One requested impersonation, printed the way Go prints a `corev1.ObjectReference`
/// (`{Kind Namespace Name UID APIVersion ResourceVersion FieldPath}`) in the error for
/// impersonation without a user.
fn object_reference(kind: &str, name: &str, api_version: &str, field_path: &str) -> String {
    format!("{{{kind}  {name}  {api_version}  {field_path}}}")
}

/// The identity a request acts as: the authenticated user, or whom its `Impersonate-*`
/// headers name. `Err` carries the API server's message for impersonation headers without
/// `Impersonate-User` (it answers 500 with it).
pub(crate) fn effective_user(
    headers: &HeaderMap,
    authenticated: &UserInfo,
) -> Result<UserInfo, String> {
    let text = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let user = headers
        .get("impersonate-user")
        .map(text)
        .filter(|u| !u.is_empty());
    let groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .map(text)
        .collect();
    let uid = headers
        .get("impersonate-uid")
        .map(text)
        .filter(|u| !u.is_empty());
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        if let Some(key) = name.as_str().strip_prefix(EXTRA_HEADER_PREFIX) {
            // Header names arrive lowercased; keys may be percent-encoded.
            let key = percent_encoding::percent_decode_str(key)
                .decode_utf8()
                .map_or_else(|_| key.to_owned(), |k| k.into_owned());
            extra.entry(key).or_default().push(text(value));
        }
    }
    let Some(username) = user else {
        if groups.is_empty() && uid.is_none() && extra.is_empty() {
            return Ok(authenticated.clone());
        }
        let mut requested: Vec<String> = groups
            .iter()
            .map(|g| object_reference("Group", g, "", ""))
            .collect();
        for (key, values) in &extra {
            for v in values {
                requested.push(object_reference(
                    "UserExtra",
                    v,
                    "authentication.k8s.io/v1",
                    key,
                ));
            }
        }
        if let Some(uid) = &uid {
            requested.push(object_reference("UID", uid, "authentication.k8s.io/v1", ""));
        }
        return Err(format!(
            "requested [{}] without impersonating a user",
            requested.join(" ")
        ));
    };
    // Groups given explicitly are the whole list; a service account without them gets its
    // fixed groups.
    let groups = match split_service_account(&username) {
        Some((namespace, _)) if groups.is_empty() => service_account_groups(namespace).to_vec(),
        _ => groups,
    };
    let mut user = UserInfo {
        username,
        uid: uid.unwrap_or_default(),
        groups,
        extra,
    };
    if user.username == ANONYMOUS {
        if !user.groups.iter().any(|g| g == UNAUTHENTICATED) {
            user.groups.push(UNAUTHENTICATED.to_owned());
        }
        return Ok(user);
    }
    Ok(user.with_authenticated_group())
}

/// Whom a [`Denial`] applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// Every user.
    Anyone,
    /// The user with exactly this name.
    User(String),
    /// Every member of this group.
    Group(String),
    /// Everyone the inner subject does not cover: `AllBut(Group("sre"))` in a denial
    /// states a role binding ("only members of sre may ..."), as an RBAC table would.
    AllBut(Box<Subject>),
}

impl Subject {
    fn matches(&self, user: &UserInfo) -> bool {
        match self {
            Subject::Anyone => true,
            Subject::User(name) => user.username == *name,
            Subject::Group(group) => user.groups.iter().any(|g| g == group),
            Subject::AllBut(inner) => !inner.matches(user),
        }
    }
}

/// Which resource requests a [`Denial`] covers; `None` fields match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceMatch {
    /// API group (`""` for the core group); `None` for every group.
    pub api_group: Option<String>,
    /// `pods`, `pods/exec`, `*/scale` or `*`, matched as RBAC matches rule resources.
    pub resource: String,
    /// Namespace (`""` for cluster-scoped requests); `None` for every namespace.
    pub namespace: Option<String>,
    /// Object name; `None` for every object.
    pub name: Option<String>,
}

impl ResourceMatch {
    /// `resource` in every API group, namespace and object.
    pub fn new(resource: impl Into<String>) -> Self {
        Self {
            api_group: None,
            resource: resource.into(),
            namespace: None,
            name: None,
        }
    }

    /// Only in this API group.
    pub fn in_api_group(mut self, group: impl Into<String>) -> Self {
        self.api_group = Some(group.into());
        self
    }

    /// Only in this namespace.
    pub fn in_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Only the object with this name.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// What a [`Denial`] covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenialTarget {
    /// Resource requests.
    Resource(ResourceMatch),
    /// A non-resource URL: exact, `*`, or a prefix ending in `*` (as in RBAC).
    NonResource(String),
}

impl DenialTarget {
    /// `resource` in every API group, namespace and object.
    pub fn resource(resource: impl Into<String>) -> Self {
        DenialTarget::Resource(ResourceMatch::new(resource))
    }

    /// A non-resource URL such as `/metrics` or `/logs/*`.
    pub fn path(path: impl Into<String>) -> Self {
        DenialTarget::NonResource(path.into())
    }
}

impl From<ResourceMatch> for DenialTarget {
    fn from(m: ResourceMatch) -> Self {
        DenialTarget::Resource(m)
    }
}

/// One thing the test server's authorizer refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Whom it applies to.
    pub subject: Subject,
    /// The verb (`get`, `delete`, `impersonate`, ...) or `*` for every verb.
    pub verb: String,
    /// What it covers.
    pub target: DenialTarget,
    /// The review's `status.reason` (kubectl prints `no - <reason>`); may be empty.
    pub reason: String,
}

impl Denial {
    /// `subject` may not `verb` `target`.
    pub fn new(subject: Subject, verb: impl Into<String>, target: impl Into<DenialTarget>) -> Self {
        Self {
            subject,
            verb: verb.into(),
            target: target.into(),
            reason: String::new(),
        }
    }

    /// The user named `user` may not `verb` `target`.
    pub fn user(
        user: impl Into<String>,
        verb: impl Into<String>,
        target: impl Into<DenialTarget>,
    ) -> Self {
        Self::new(Subject::User(user.into()), verb, target)
    }

    /// Members of `group` may not `verb` `target`.
    pub fn group(
        group: impl Into<String>,
        verb: impl Into<String>,
        target: impl Into<DenialTarget>,
    ) -> Self {
        Self::new(Subject::Group(group.into()), verb, target)
    }

    /// Only members of `group` may `verb` `target` (everyone else is denied): a role
    /// bound to one group.
    pub fn only_group(
        group: impl Into<String>,
        verb: impl Into<String>,
        target: impl Into<DenialTarget>,
    ) -> Self {
        Self::new(
            Subject::AllBut(Box::new(Subject::Group(group.into()))),
            verb,
            target,
        )
    }

    /// Nobody may `verb` `target`.
    pub fn anyone(verb: impl Into<String>, target: impl Into<DenialTarget>) -> Self {
        Self::new(Subject::Anyone, verb, target)
    }

    /// Sets the reason reported with the denial.
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    fn covers(&self, user: &UserInfo, access: &Access<'_>) -> bool {
        if !self.subject.matches(user) || !word_matches(&self.verb, access.verb()) {
            return false;
        }
        match (&self.target, access) {
            (
                DenialTarget::Resource(m),
                Access::Resource {
                    api_group,
                    resource,
                    subresource,
                    namespace,
                    name,
                    ..
                },
            ) => {
                m.api_group
                    .as_deref()
                    .is_none_or(|g| word_matches(g, api_group))
                    && resource_matches(&m.resource, resource, subresource)
                    && m.namespace
                        .as_deref()
                        .is_none_or(|ns| scope_matches(ns, namespace))
                    && m.name.as_deref().is_none_or(|n| scope_matches(n, name))
            }
            (DenialTarget::NonResource(pattern), Access::NonResource { path, .. }) => {
                path_matches(pattern, path)
            }
            _ => false,
        }
    }
}

/// A denial's `*` matches anything, and a request for `*` (asking about everything)
/// includes whatever the denial names.
fn word_matches(denied: &str, requested: &str) -> bool {
    denied == "*" || requested == "*" || denied == requested
}

/// An empty namespace or name in a review means "all of them" (or the cluster scope), so a
/// narrower denial still applies to it.
fn scope_matches(denied: &str, requested: &str) -> bool {
    requested.is_empty() || word_matches(denied, requested)
}

/// RBAC's `ResourceMatches`: `*`, `resource` or `resource/subresource` exactly, or
/// `*/subresource`; a request for resource `*` is covered by any denial.
fn resource_matches(denied: &str, resource: &str, subresource: &str) -> bool {
    if denied == "*" || resource == "*" {
        return true;
    }
    let combined = if subresource.is_empty() {
        resource.to_owned()
    } else {
        format!("{resource}/{subresource}")
    };
    denied == combined
        || (!subresource.is_empty() && denied.strip_prefix("*/") == Some(subresource))
}

/// RBAC's `NonResourceURLMatches`: exact, `*`, or a prefix ending in `*`.
fn path_matches(denied: &str, path: &str) -> bool {
    denied == "*"
        || path == "*"
        || denied == path
        || denied
            .strip_suffix('*')
            .is_some_and(|prefix| path.starts_with(prefix))
}

/// The attributes of one access question (a review's `resourceAttributes` or
/// `nonResourceAttributes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access<'a> {
    /// A resource request.
    Resource {
        verb: &'a str,
        api_group: &'a str,
        resource: &'a str,
        subresource: &'a str,
        namespace: &'a str,
        name: &'a str,
    },
    /// A non-resource URL.
    NonResource { verb: &'a str, path: &'a str },
}

impl Access<'_> {
    fn verb(&self) -> &str {
        match self {
            Access::Resource { verb, .. } | Access::NonResource { verb, .. } => verb,
        }
    }
}

/// The authorizer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Allowed.
    Allow,
    /// Explicitly denied, with the denial's reason.
    Deny(String),
}

/// Decides access reviews and scale requests: everything is allowed except what a
/// [`Denial`] forbids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authorizer {
    denials: Vec<Denial>,
}

impl Authorizer {
    /// Allows everyone everything (the default).
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Adds a denial.
    pub fn deny(mut self, denial: Denial) -> Self {
        self.denials.push(denial);
        self
    }

    /// The configured denials, in order.
    pub fn denials(&self) -> &[Denial] {
        &self.denials
    }

    /// The decision for `user` asking for `access`; the first covering denial wins.
    pub(crate) fn decide(&self, user: &UserInfo, access: &Access<'_>) -> Decision {
        match self.denials.iter().find(|d| d.covers(user, access)) {
            Some(d) => Decision::Deny(d.reason.clone()),
            None => Decision::Allow,
        }
    }

    /// Whether a rules review of `namespace` for `user` would be incomplete: some denial
    /// applies there, and denials cannot be expressed as (allow-only) rules.
    pub(crate) fn rules_incomplete(&self, user: &UserInfo, namespace: &str) -> bool {
        self.denials.iter().any(|d| {
            d.subject.matches(user)
                && match &d.target {
                    // Cluster-scoped denials and non-resource ones count in every namespace,
                    // as cluster roles do in a real rules review.
                    DenialTarget::Resource(m) => m
                        .namespace
                        .as_deref()
                        .is_none_or(|ns| ns.is_empty() || ns == "*" || ns == namespace),
                    DenialTarget::NonResource(_) => true,
                }
        })
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .unwrap_or_else(|e| panic!("header {k}: {e}"));
            map.append(
                name,
                HeaderValue::from_str(v).unwrap_or_else(|e| panic!("value {v}: {e}")),
            );
        }
        map
    }

    /// Request headers, then the identity or the error message.
    type ImpersonationCase = (
        Vec<(&'static str, &'static str)>,
        Result<UserInfo, &'static str>,
    );

    #[test]
    fn impersonation_resolves_like_the_api_server() {
        let admin = UserInfo::admin().with_authenticated_group();
        let cases: Vec<ImpersonationCase> = vec![
            (vec![], Ok(admin.clone())),
            (
                vec![("impersonate-user", "alice")],
                Ok(UserInfo::new("alice", [AUTHENTICATED])),
            ),
            (
                vec![
                    ("impersonate-user", "alice"),
                    ("impersonate-group", "dev"),
                    ("impersonate-group", "ops"),
                    ("impersonate-uid", "u-1"),
                    ("impersonate-extra-scopes", "a"),
                    ("impersonate-extra-scopes", "b"),
                    ("impersonate-extra-example.com%2fteam", "x"),
                ],
                Ok(UserInfo {
                    username: "alice".into(),
                    uid: "u-1".into(),
                    groups: vec!["dev".into(), "ops".into(), AUTHENTICATED.into()],
                    extra: BTreeMap::from([
                        ("example.com/team".to_owned(), vec!["x".to_owned()]),
                        ("scopes".to_owned(), vec!["a".to_owned(), "b".to_owned()]),
                    ]),
                }),
            ),
            (
                vec![("impersonate-user", "system:serviceaccount:prod:web")],
                Ok(UserInfo::new(
                    "system:serviceaccount:prod:web",
                    [
                        "system:serviceaccounts",
                        "system:serviceaccounts:prod",
                        AUTHENTICATED,
                    ],
                )),
            ),
            // Explicit groups replace a service account's fixed ones.
            (
                vec![
                    ("impersonate-user", "system:serviceaccount:prod:web"),
                    ("impersonate-group", "g"),
                ],
                Ok(UserInfo::new(
                    "system:serviceaccount:prod:web",
                    ["g", AUTHENTICATED],
                )),
            ),
            (
                vec![
                    ("impersonate-user", "bob"),
                    ("impersonate-group", AUTHENTICATED),
                ],
                Ok(UserInfo::new("bob", [AUTHENTICATED])),
            ),
            (
                vec![
                    ("impersonate-user", "bob"),
                    ("impersonate-group", UNAUTHENTICATED),
                ],
                Ok(UserInfo::new("bob", [UNAUTHENTICATED])),
            ),
            (
                vec![("impersonate-user", ANONYMOUS)],
                Ok(UserInfo::new(ANONYMOUS, [UNAUTHENTICATED])),
            ),
            (
                vec![("impersonate-group", "system:masters")],
                Err("requested [{Group  system:masters    }] without impersonating a user"),
            ),
            (
                vec![("impersonate-user", ""), ("impersonate-uid", "u")],
                Err(
                    "requested [{UID  u  authentication.k8s.io/v1  }] without impersonating a user",
                ),
            ),
            (
                vec![("impersonate-extra-k", "v")],
                Err(
                    "requested [{UserExtra  v  authentication.k8s.io/v1  k}] without impersonating a user",
                ),
            ),
        ];
        for (pairs, want) in cases {
            let got = effective_user(&headers(&pairs), &admin);
            assert_eq!(got, want.map_err(str::to_owned), "{pairs:?}");
        }
    }

    #[test]
    fn authenticated_group_is_added_once() {
        let cases = [
            (UserInfo::new("a", ["x"]), vec!["x", AUTHENTICATED]),
            (
                UserInfo::new("a", [AUTHENTICATED, "x"]),
                vec![AUTHENTICATED, "x"],
            ),
            (UserInfo::anonymous(), vec![UNAUTHENTICATED]),
            (
                UserInfo::service_account("ns", "sa"),
                vec![
                    "system:serviceaccounts",
                    "system:serviceaccounts:ns",
                    AUTHENTICATED,
                ],
            ),
        ];
        for (user, want) in cases {
            assert_eq!(
                user.clone().with_authenticated_group().groups,
                want,
                "{user:?}"
            );
        }
    }

    fn res<'a>(
        verb: &'a str,
        group: &'a str,
        resource: &'a str,
        sub: &'a str,
        ns: &'a str,
        name: &'a str,
    ) -> Access<'a> {
        Access::Resource {
            verb,
            api_group: group,
            resource,
            subresource: sub,
            namespace: ns,
            name,
        }
    }

    #[test]
    fn a_role_bound_to_one_group() {
        let authz = Authorizer::allow_all().deny(
            Denial::only_group(
                "sre",
                "approve",
                ResourceMatch::new("accessrequests").in_api_group("chaperone.dev"),
            )
            .because("no RBAC policy matched"),
        );
        let approve = res(
            "approve",
            "chaperone.dev",
            "accessrequests",
            "",
            "ns",
            "ar-1",
        );
        let sre = UserInfo::new("alice", ["sre", AUTHENTICATED]);
        let dev = UserInfo::new("carol", ["dev", AUTHENTICATED]);
        assert_eq!(authz.decide(&sre, &approve), Decision::Allow);
        assert_eq!(
            authz.decide(&dev, &approve),
            Decision::Deny("no RBAC policy matched".to_owned())
        );
        // Other verbs are untouched.
        let get = res("get", "chaperone.dev", "accessrequests", "", "ns", "ar-1");
        assert_eq!(authz.decide(&dev, &get), Decision::Allow);
    }

    #[test]
    fn denials_cover_what_they_name() {
        let alice = UserInfo::new("alice", ["dev", AUTHENTICATED]);
        let bob = UserInfo::new("bob", [AUTHENTICATED]);
        let authz = Authorizer::allow_all()
            .deny(
                Denial::user("alice", "delete", DenialTarget::resource("nodes"))
                    .because("no nodes"),
            )
            .deny(Denial::group(
                "dev",
                "get",
                ResourceMatch::new("secrets")
                    .in_api_group("")
                    .in_namespace("prod"),
            ))
            .deny(Denial::user(
                "alice",
                "create",
                DenialTarget::resource("pods/exec"),
            ))
            .deny(Denial::user(
                "alice",
                "update",
                DenialTarget::resource("*/scale"),
            ))
            .deny(Denial::user(
                "alice",
                "*",
                ResourceMatch::new("configmaps").named("locked"),
            ))
            .deny(Denial::anyone("get", DenialTarget::path("/metrics*")));
        let deny = |reason: &str| Decision::Deny(reason.to_owned());
        let cases: Vec<(&UserInfo, Access<'_>, Decision)> = vec![
            (
                &alice,
                res("delete", "", "nodes", "", "", "n1"),
                deny("no nodes"),
            ),
            (
                &alice,
                res("delete", "", "nodes", "", "", ""),
                deny("no nodes"),
            ),
            (
                &bob,
                res("delete", "", "nodes", "", "", ""),
                Decision::Allow,
            ),
            (&alice, res("get", "", "nodes", "", "", ""), Decision::Allow),
            // Asking about every verb or resource includes the denied one.
            (&alice, res("*", "", "nodes", "", "", ""), deny("no nodes")),
            (
                &alice,
                res("delete", "*", "*", "", "", ""),
                deny("no nodes"),
            ),
            // Group subject, API group and namespace.
            (&alice, res("get", "", "secrets", "", "prod", "s"), deny("")),
            (&alice, res("get", "", "secrets", "", "", ""), deny("")),
            (
                &alice,
                res("get", "", "secrets", "", "dev", ""),
                Decision::Allow,
            ),
            (
                &alice,
                res("get", "other", "secrets", "", "prod", ""),
                Decision::Allow,
            ),
            (
                &bob,
                res("get", "", "secrets", "", "prod", ""),
                Decision::Allow,
            ),
            // Subresources: exact, never the parent; `*/sub` across resources.
            (
                &alice,
                res("create", "", "pods", "exec", "d", "p"),
                deny(""),
            ),
            (
                &alice,
                res("create", "", "pods", "", "d", ""),
                Decision::Allow,
            ),
            (
                &alice,
                res("create", "", "pods", "attach", "d", "p"),
                Decision::Allow,
            ),
            (
                &alice,
                res("update", "apps", "deployments", "scale", "d", "x"),
                deny(""),
            ),
            (
                &alice,
                res("update", "apps", "deployments", "", "d", "x"),
                Decision::Allow,
            ),
            // Names.
            (
                &alice,
                res("patch", "", "configmaps", "", "d", "locked"),
                deny(""),
            ),
            (
                &alice,
                res("patch", "", "configmaps", "", "d", "open"),
                Decision::Allow,
            ),
            (&alice, res("list", "", "configmaps", "", "d", ""), deny("")),
            // Non-resource URLs never match resource denials, and the reverse.
            (
                &bob,
                Access::NonResource {
                    verb: "get",
                    path: "/metrics",
                },
                deny(""),
            ),
            (
                &bob,
                Access::NonResource {
                    verb: "get",
                    path: "/metrics/slis",
                },
                deny(""),
            ),
            (
                &bob,
                Access::NonResource {
                    verb: "get",
                    path: "/healthz",
                },
                Decision::Allow,
            ),
            (
                &bob,
                Access::NonResource {
                    verb: "post",
                    path: "/metrics",
                },
                Decision::Allow,
            ),
            (
                &alice,
                Access::NonResource {
                    verb: "delete",
                    path: "/nodes",
                },
                Decision::Allow,
            ),
        ];
        for (user, access, want) in cases {
            assert_eq!(
                authz.decide(user, &access),
                want,
                "{} {access:?}",
                user.username
            );
        }
        assert_eq!(
            Authorizer::allow_all().decide(&alice, &res("*", "*", "*", "", "", "")),
            Decision::Allow
        );
    }

    #[test]
    fn rules_reviews_are_incomplete_where_denials_apply() {
        let alice = UserInfo::new("alice", [AUTHENTICATED]);
        let bob = UserInfo::new("bob", [AUTHENTICATED]);
        let cases: Vec<(Authorizer, &UserInfo, &str, bool)> = vec![
            (Authorizer::allow_all(), &alice, "default", false),
            (
                Authorizer::allow_all().deny(Denial::user(
                    "alice",
                    "delete",
                    DenialTarget::resource("nodes"),
                )),
                &alice,
                "default",
                true,
            ),
            (
                Authorizer::allow_all().deny(Denial::user(
                    "alice",
                    "delete",
                    DenialTarget::resource("nodes"),
                )),
                &bob,
                "default",
                false,
            ),
            (
                Authorizer::allow_all().deny(Denial::anyone(
                    "get",
                    ResourceMatch::new("pods").in_namespace("prod"),
                )),
                &bob,
                "default",
                false,
            ),
            (
                Authorizer::allow_all().deny(Denial::anyone(
                    "get",
                    ResourceMatch::new("pods").in_namespace("prod"),
                )),
                &bob,
                "prod",
                true,
            ),
            (
                Authorizer::allow_all().deny(Denial::anyone("get", DenialTarget::path("/metrics"))),
                &bob,
                "default",
                true,
            ),
        ];
        for (authz, user, ns, want) in cases {
            assert_eq!(
                authz.rules_incomplete(user, ns),
                want,
                "{authz:?} {} in {ns}",
                user.username
            );
        }
    }
}
