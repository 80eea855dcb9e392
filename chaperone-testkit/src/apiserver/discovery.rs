//! The resources the test server serves, and the discovery documents describing them.
//!
//! Shapes follow `shared/k8s-wire-reference.md` section 3: aggregated v2 discovery only when
//! the Accept header asks for it with the exact `g`/`v`/`as` parameters (and then the
//! response Content-Type carries them, which is how client-go picks its parser), legacy
//! `APIVersions`/`APIGroupList`/`APIResourceList` otherwise, with every field that the Go
//! types mark as required present.

use std::sync::{Mutex, RwLock};

use serde_json::{Value, json};

/// Verbs of an ordinary namespaced or cluster-scoped resource.
const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
/// Namespaces have no `deletecollection` in the real API server.
const NAMESPACE_VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];
/// Verbs of the `status` and `scale` subresources.
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];
/// Group, version and kind of every `scale` subresource's objects (the real server answers
/// `apps/v1` scale requests with `autoscaling/v1` `Scale`).
pub(crate) const SCALE_GROUP: &str = "autoscaling";
/// See [`SCALE_GROUP`].
pub(crate) const SCALE_VERSION: &str = "v1";
/// See [`SCALE_GROUP`].
pub(crate) const SCALE_KIND: &str = "Scale";
/// The review APIs accept nothing but create.
const CREATE_ONLY: &[&str] = &["create"];

/// One served resource (a REST collection) and how it is described in discovery.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ResourceDef {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Plural resource name, as in URLs.
    pub plural: &'static str,
    /// Singular name.
    pub singular: &'static str,
    /// Kind of the objects.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// kubectl short names.
    pub short_names: &'static [&'static str],
    /// Categories (`all` makes `kubectl get all` include the resource).
    pub categories: &'static [&'static str],
    /// Supported verbs.
    pub verbs: &'static [&'static str],
    /// Whether a `status` subresource exists; then writes to the main resource keep the
    /// stored status and writes to `/status` change only the status, as in the real server.
    pub has_status: bool,
    /// Whether a `scale` subresource exists (reads and writes `spec.replicas` through an
    /// `autoscaling/v1` `Scale`).
    pub has_scale: bool,
    /// Whether the resource was registered by a CustomResourceDefinition (then it has no
    /// typed schema, strategic merge patch is refused, and `metadata.generation` counts
    /// changes to anything but metadata and status).
    pub custom: bool,
    /// The CRD's `additionalPrinterColumns` (Tables of custom resources).
    pub columns: &'static [PrinterColumn],
}

/// One `additionalPrinterColumns` entry of a CustomResourceDefinition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrinterColumn {
    /// Column name.
    pub name: String,
    /// OpenAPI type (`string`, `integer`, `date`, ...).
    pub type_: String,
    /// A simple JSONPath (`.status.phase`): dotted field names only.
    pub json_path: String,
    /// Priority (0 = shown by default).
    pub priority: i64,
    /// Description.
    pub description: String,
}

impl ResourceDef {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether the resource supports `verb`.
    pub fn supports(&self, verb: &str) -> bool {
        self.verbs.contains(&verb)
    }

    /// The kind of its lists (`PodList`).
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }
}

/// Every resource the test server serves. Of the subresources, `status` and `scale` are
/// served by the generic handlers; exec, attach, log and portforward by `streams`.
pub(crate) static RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        verbs: NAMESPACE_VERBS,
        has_status: true,
        has_scale: false,
        custom: false,
        columns: &[],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        categories: &["all"],
        verbs: ALL_VERBS,
        has_status: true,
        has_scale: false,
        custom: false,
        columns: &[],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        categories: &[],
        verbs: ALL_VERBS,
        has_status: false,
        has_scale: false,
        custom: false,
        columns: &[],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        categories: &[],
        verbs: ALL_VERBS,
        has_status: false,
        has_scale: false,
        custom: false,
        columns: &[],
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
        categories: &[],
        verbs: ALL_VERBS,
        has_status: false,
        has_scale: false,
        custom: false,
        columns: &[],
    },
    ResourceDef {
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short_names: &["deploy"],
        categories: &["all"],
        verbs: ALL_VERBS,
        has_status: true,
        has_scale: true,
        custom: false,
        columns: &[],
    },
    ResourceDef {
        group: "apps",
        version: "v1",
        plural: "replicasets",
        singular: "replicaset",
        kind: "ReplicaSet",
        namespaced: true,
        short_names: &["rs"],
        categories: &["all"],
        verbs: ALL_VERBS,
        has_status: true,
        has_scale: true,
        custom: false,
        columns: &[],
    },
    ResourceDef {
        group: "apps",
        version: "v1",
        plural: "statefulsets",
        singular: "statefulset",
        kind: "StatefulSet",
        namespaced: true,
        short_names: &["sts"],
        categories: &["all"],
        verbs: ALL_VERBS,
        has_status: true,
        has_scale: true,
        custom: false,
        columns: &[],
    },
];

/// The review APIs (`kubectl auth can-i`, `auth whoami`, TokenReview clients): create-only
/// and never stored, so they appear in discovery but not in the store, Tables or OpenAPI.
/// Listed in the real server's order: authentication before authorization, resources
/// alphabetically.
pub(crate) static REVIEWS: &[ResourceDef] = &[
    review(
        "authentication.k8s.io",
        ("selfsubjectreviews", "selfsubjectreview"),
        "SelfSubjectReview",
        false,
    ),
    review(
        "authentication.k8s.io",
        ("tokenreviews", "tokenreview"),
        "TokenReview",
        false,
    ),
    review(
        "authorization.k8s.io",
        ("localsubjectaccessreviews", "localsubjectaccessreview"),
        "LocalSubjectAccessReview",
        true,
    ),
    review(
        "authorization.k8s.io",
        ("selfsubjectaccessreviews", "selfsubjectaccessreview"),
        "SelfSubjectAccessReview",
        false,
    ),
    review(
        "authorization.k8s.io",
        ("selfsubjectrulesreviews", "selfsubjectrulesreview"),
        "SelfSubjectRulesReview",
        false,
    ),
    review(
        "authorization.k8s.io",
        ("subjectaccessreviews", "subjectaccessreview"),
        "SubjectAccessReview",
        false,
    ),
];

const fn review(
    group: &'static str,
    (plural, singular): (&'static str, &'static str),
    kind: &'static str,
    namespaced: bool,
) -> ResourceDef {
    ResourceDef {
        group,
        version: "v1",
        plural,
        singular,
        kind,
        namespaced,
        short_names: &[],
        categories: &[],
        verbs: CREATE_ONLY,
        has_status: false,
        has_scale: false,
        custom: false,
        columns: &[],
    }
}

/// The CustomResourceDefinition resource itself: stored like any cluster-scoped object,
/// and each definition created registers its resources in the server's [`Catalog`].
pub(crate) static CRDS: ResourceDef = ResourceDef {
    group: "apiextensions.k8s.io",
    version: "v1",
    plural: "customresourcedefinitions",
    singular: "customresourcedefinition",
    kind: "CustomResourceDefinition",
    namespaced: false,
    short_names: &["crd", "crds"],
    categories: &["api-extensions"],
    verbs: ALL_VERBS,
    has_status: true,
    has_scale: false,
    custom: false,
    columns: &[],
};

/// The review resource served at `group`/`version`/`plural`, if any.
pub(crate) fn find_review(
    group: &str,
    version: &str,
    plural: &str,
) -> Option<&'static ResourceDef> {
    REVIEWS
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The built-in resource served at `group`/`version`/`plural`, if any (custom resources
/// are found through a [`Catalog`]).
pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// What one server serves: the built-in resources, the CustomResourceDefinition resource
/// and the custom resources registered by the definitions created so far.
///
/// Registered definitions are leaked (`&'static`, like the built-in table) and kept for
/// the server's life: registering the same group/version/plural again returns the first
/// registration, so watches and stored objects keep pointing at one definition. Deleting
/// a definition unregisters its resources; their objects stay in the store, unreachable
/// (the real server deletes them).
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    custom: RwLock<Vec<&'static ResourceDef>>,
    /// Every definition ever registered, so a re-registration reuses it.
    known: Mutex<Vec<&'static ResourceDef>>,
}

impl Catalog {
    /// The built-in resources only.
    pub fn new() -> Self {
        Self::default()
    }

    fn custom(&self) -> Vec<&'static ResourceDef> {
        self.custom
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every stored resource: built-in ones, CustomResourceDefinitions, custom ones.
    pub fn stored(&self) -> Vec<&'static ResourceDef> {
        let mut all: Vec<&'static ResourceDef> = RESOURCES.iter().collect();
        all.push(&CRDS);
        all.extend(self.custom());
        all
    }

    /// Everything discovery describes: the stored resources, then the reviews.
    fn discoverable(&self) -> Vec<&'static ResourceDef> {
        let mut all = self.stored();
        all.extend(REVIEWS.iter());
        all
    }

    /// The stored resource served at `group`/`version`/`plural`, if any.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&'static ResourceDef> {
        self.stored()
            .into_iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// The stored resource `group`/`plural` in any version (the first registered).
    pub fn find_group_plural(&self, group: &str, plural: &str) -> Option<&'static ResourceDef> {
        self.stored()
            .into_iter()
            .find(|r| r.group == group && r.plural == plural)
    }

    /// The stored resource whose objects have this `apiVersion` and `kind`.
    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<&'static ResourceDef> {
        self.stored()
            .into_iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
    }

    /// Whether `group`/`version` holds stored resources (then unknown resources in it are
    /// 404s with a Status). The review group versions do not count: they have their own
    /// handlers.
    pub fn serves_group_version(&self, group: &str, version: &str) -> bool {
        self.stored()
            .into_iter()
            .any(|r| r.group == group && r.version == version)
    }

    /// Registers the served versions of a CustomResourceDefinition (as stored), returning
    /// their resources; an invalid definition is refused with the reason.
    pub fn register(&self, crd: &Value) -> Result<Vec<&'static ResourceDef>, String> {
        let defs = super::crd::parse(crd)?;
        let mut registered = Vec::new();
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut custom = self.custom.write().unwrap_or_else(|e| e.into_inner());
        for def in defs {
            let def = match known.iter().find(|k| {
                k.group == def.group && k.version == def.version && k.plural == def.plural
            }) {
                Some(existing) => *existing,
                None => {
                    let leaked: &'static ResourceDef = Box::leak(Box::new(def));
                    known.push(leaked);
                    leaked
                }
            };
            if !custom.iter().any(|c| std::ptr::eq(*c, def)) {
                custom.push(def);
            }
            registered.push(def);
        }
        Ok(registered)
    }

    /// Stops serving the resources of the definition named `name` (`<plural>.<group>`).
    pub fn unregister(&self, name: &str) {
        self.custom
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| format!("{}.{}", r.plural, r.group) != name);
    }

    /// Named groups (not the core group) in the order they are listed, each with its
    /// versions in order.
    fn named_groups(&self) -> Vec<(&'static str, Vec<&'static str>)> {
        let mut groups: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
        for r in self
            .discoverable()
            .into_iter()
            .filter(|r| !r.group.is_empty())
        {
            match groups.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, versions)) => {
                    if !versions.contains(&r.version) {
                        versions.push(r.version);
                    }
                }
                None => groups.push((r.group, vec![r.version])),
            }
        }
        groups
    }

    /// `GET /apis` in legacy form.
    pub fn legacy_group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .named_groups()
            .into_iter()
            .map(|(g, versions)| legacy_group(g, &versions))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /apis/<group>`: the APIGroup document, if the group is served.
    pub fn legacy_group_doc(&self, group: &str) -> Option<Value> {
        let (name, versions) = self.named_groups().into_iter().find(|(g, _)| *g == group)?;
        let mut doc = legacy_group(name, &versions);
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("kind".into(), "APIGroup".into());
            obj.insert("apiVersion".into(), "v1".into());
        }
        Some(doc)
    }

    /// `GET /api/v1` or `GET /apis/<g>/<v>`: the APIResourceList, if the group version is
    /// served.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut resources = Vec::new();
        for r in self
            .discoverable()
            .into_iter()
            .filter(|r| r.group == group && r.version == version)
        {
            let mut entry = json!({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": r.verbs,
            });
            if !r.short_names.is_empty() {
                entry["shortNames"] = json!(r.short_names);
            }
            if !r.categories.is_empty() {
                entry["categories"] = json!(r.categories);
            }
            resources.push(entry);
            // Sorted by name, as the real server lists them: `scale` before `status`.
            if r.has_scale {
                resources.push(json!({
                    "name": format!("{}/scale", r.plural),
                    "singularName": "",
                    "namespaced": r.namespaced,
                    "group": SCALE_GROUP,
                    "version": SCALE_VERSION,
                    "kind": SCALE_KIND,
                    "verbs": STATUS_VERBS,
                }));
            }
            if r.has_status {
                resources.push(json!({
                    "name": format!("{}/status", r.plural),
                    "singularName": "",
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": STATUS_VERBS,
                }));
            }
        }
        if resources.is_empty() {
            return None;
        }
        let gv = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        Some(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        )
    }

    fn aggregated_group(&self, group: &str, versions: &[&str]) -> Value {
        let all = self.discoverable();
        let versions: Vec<Value> = versions
            .iter()
            .map(|version| {
                let resources: Vec<Value> = all
                    .iter()
                    .filter(|r| r.group == group && r.version == *version)
                    .map(|r| aggregated_resource(r))
                    .collect();
                json!({"version": version, "resources": resources, "freshness": "Current"})
            })
            .collect();
        // ObjectMeta.name is omitempty in Go, so the core group's entry has empty metadata.
        let metadata = if group.is_empty() {
            json!({})
        } else {
            json!({"name": group})
        };
        json!({"metadata": metadata, "versions": versions})
    }

    /// Aggregated discovery for `/api` (`core == true`) or `/apis`.
    pub fn aggregated(&self, core: bool, version: &str) -> Value {
        let items: Vec<Value> = if core {
            vec![self.aggregated_group("", &["v1"])]
        } else {
            self.named_groups()
                .into_iter()
                .map(|(g, versions)| self.aggregated_group(g, &versions))
                .collect()
        };
        json!({
            "kind": "APIGroupDiscoveryList",
            "apiVersion": format!("apidiscovery.k8s.io/{version}"),
            "metadata": {},
            "items": items,
        })
    }
}

/// Which aggregated discovery version the Accept header asks for (`v2` or `v2beta1`),
/// taking the first acceptable entry; `None` means legacy discovery.
pub(crate) fn aggregated_version(accept: &str) -> Option<&'static str> {
    for media in super::parse_accept(accept) {
        if media.essence != "application/json"
            || media.param("g") != Some("apidiscovery.k8s.io")
            || media.param("as") != Some("APIGroupDiscoveryList")
        {
            continue;
        }
        match media.param("v") {
            Some("v2") => return Some("v2"),
            Some("v2beta1") => return Some("v2beta1"),
            _ => {}
        }
    }
    None
}

/// The exact Content-Type of an aggregated discovery response.
pub(crate) fn aggregated_content_type(version: &str) -> String {
    format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList")
}

/// `GET /api` in legacy form.
pub(crate) fn legacy_api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn legacy_group(group: &str, versions: &[&str]) -> Value {
    let gvs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = gvs.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": gvs, "preferredVersion": preferred})
}

fn aggregated_resource(r: &ResourceDef) -> Value {
    let mut entry = json!({
        "resource": r.plural,
        "singularResource": r.singular,
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "verbs": r.verbs,
    });
    if !r.short_names.is_empty() {
        entry["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        entry["categories"] = json!(r.categories);
    }
    let mut subresources = Vec::new();
    if r.has_scale {
        subresources.push(json!({
            "subresource": "scale",
            "responseKind": {"group": SCALE_GROUP, "version": SCALE_VERSION, "kind": SCALE_KIND},
            "verbs": STATUS_VERBS,
        }));
    }
    if r.has_status {
        subresources.push(json!({
            "subresource": "status",
            "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
            "verbs": STATUS_VERBS,
        }));
    }
    if !subresources.is_empty() {
        entry["subresources"] = Value::Array(subresources);
    }
    entry
}

/// `GET /version`: all nine fields, a semver `gitVersion` (kubectl refuses anything else).
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0",
        "gitCommit": "70d3cc986aa8221cd1dfb1121852688902d3bf53",
        "gitTreeState": "clean",
        "buildDate": "2024-12-11T17:59:15Z",
        "goVersion": "go1.23.3",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregated_only_for_exact_parameters() {
        let kubectl = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        let cases = [
            (kubectl, Some("v2")),
            (
                "application/json;as=APIGroupDiscoveryList;v=v2beta1;g=apidiscovery.k8s.io",
                Some("v2beta1"),
            ),
            ("application/json", None),
            (
                "application/json;g=apidiscovery.k8s.io;v=v3;as=APIGroupDiscoveryList",
                None,
            ),
            (
                "application/json;g=other;v=v2;as=APIGroupDiscoveryList",
                None,
            ),
            ("", None),
        ];
        for (accept, want) in cases {
            assert_eq!(aggregated_version(accept), want, "Accept: {accept}");
        }
    }

    #[test]
    fn every_resource_has_the_required_fields() {
        for (group, version) in [
            ("", "v1"),
            ("apps", "v1"),
            ("authentication.k8s.io", "v1"),
            ("authorization.k8s.io", "v1"),
        ] {
            let list = Catalog::new()
                .resource_list(group, version)
                .expect("served group version");
            for r in list["resources"].as_array().expect("resources array") {
                for field in ["name", "singularName", "namespaced", "kind", "verbs"] {
                    assert!(
                        r.get(field).is_some_and(|v| !v.is_null()),
                        "{field} missing in {r}"
                    );
                }
            }
        }
        let core = Catalog::new().resource_list("", "v1").expect("core");
        let pods = core["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == "pods"))
            .cloned();
        assert_eq!(
            pods.as_ref().map(|p| p["shortNames"].clone()),
            Some(json!(["po"]))
        );
        assert_eq!(pods.map(|p| p["categories"].clone()), Some(json!(["all"])));
        assert!(Catalog::new().resource_list("batch", "v1").is_none());
    }

    #[test]
    fn aggregated_resources_carry_response_kind_and_scope() {
        let doc = Catalog::new().aggregated(true, "v2");
        assert_eq!(doc["kind"], "APIGroupDiscoveryList");
        assert_eq!(doc["apiVersion"], "apidiscovery.k8s.io/v2");
        let resources = doc["items"][0]["versions"][0]["resources"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!resources.is_empty());
        for r in &resources {
            assert!(
                r["responseKind"]["kind"]
                    .as_str()
                    .is_some_and(|k| !k.is_empty()),
                "{r}"
            );
        }
        let ns = resources
            .iter()
            .find(|r| r["resource"] == "namespaces")
            .expect("namespaces");
        assert_eq!(ns["scope"], "Cluster");
        assert_eq!(ns["shortNames"], json!(["ns"]));
        let apps = Catalog::new().aggregated(false, "v2");
        assert_eq!(apps["items"][0]["metadata"]["name"], "apps");
    }

    /// Each review resource, as every discovery format must describe it:
    /// (group, resource, kind, namespaced).
    const REVIEW_TABLE: [(&str, &str, &str, bool); 6] = [
        (
            "authentication.k8s.io",
            "selfsubjectreviews",
            "SelfSubjectReview",
            false,
        ),
        (
            "authentication.k8s.io",
            "tokenreviews",
            "TokenReview",
            false,
        ),
        (
            "authorization.k8s.io",
            "localsubjectaccessreviews",
            "LocalSubjectAccessReview",
            true,
        ),
        (
            "authorization.k8s.io",
            "selfsubjectaccessreviews",
            "SelfSubjectAccessReview",
            false,
        ),
        (
            "authorization.k8s.io",
            "selfsubjectrulesreviews",
            "SelfSubjectRulesReview",
            false,
        ),
        (
            "authorization.k8s.io",
            "subjectaccessreviews",
            "SubjectAccessReview",
            false,
        ),
    ];

    #[test]
    fn review_apis_in_every_discovery_format() {
        let groups = Catalog::new().legacy_group_list();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .map(|gs| gs.iter().filter_map(|g| g["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            names,
            [
                "apps",
                "apiextensions.k8s.io",
                "authentication.k8s.io",
                "authorization.k8s.io"
            ],
            "{groups}"
        );
        let aggregated_doc = Catalog::new().aggregated(false, "v2");
        for (group, plural, kind, namespaced) in REVIEW_TABLE {
            let doc = Catalog::new()
                .legacy_group_doc(group)
                .unwrap_or_else(|| panic!("no APIGroup for {group}"));
            assert_eq!(
                doc["preferredVersion"]["groupVersion"],
                format!("{group}/v1")
            );

            let list = Catalog::new()
                .resource_list(group, "v1")
                .unwrap_or_else(|| panic!("no list for {group}"));
            assert_eq!(list["groupVersion"], format!("{group}/v1"));
            let entry = list["resources"]
                .as_array()
                .and_then(|rs| rs.iter().find(|r| r["name"] == plural))
                .unwrap_or_else(|| panic!("{plural} missing from {list}"));
            assert_eq!(
                entry,
                &json!({
                    "name": plural,
                    "singularName": plural.trim_end_matches('s'),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": ["create"],
                }),
            );

            let versions = aggregated_doc["items"]
                .as_array()
                .and_then(|items| items.iter().find(|i| i["metadata"]["name"] == group))
                .map(|item| item["versions"].clone())
                .unwrap_or_else(|| panic!("{group} missing from {aggregated_doc}"));
            assert_eq!(versions[0]["version"], "v1");
            let entry = versions[0]["resources"]
                .as_array()
                .and_then(|rs| rs.iter().find(|r| r["resource"] == plural))
                .unwrap_or_else(|| panic!("{plural} missing from {versions}"));
            assert_eq!(
                entry,
                &json!({
                    "resource": plural,
                    "singularResource": plural.trim_end_matches('s'),
                    "scope": if namespaced { "Namespaced" } else { "Cluster" },
                    "responseKind": {"group": group, "version": "v1", "kind": kind},
                    "verbs": ["create"],
                }),
            );
            assert_eq!(find_review(group, "v1", plural).map(|r| r.kind), Some(kind));
            // Not stored, so unknown to the generic handlers and the store.
            assert!(find(group, "v1", plural).is_none());
            assert!(
                Catalog::new()
                    .find_kind(&format!("{group}/v1"), kind)
                    .is_none()
            );
        }
        // Reviews are not core resources, and /api stays as it was.
        assert!(
            !Catalog::new()
                .aggregated(true, "v2")
                .to_string()
                .contains("review"),
            "core discovery lists a review"
        );
        assert!(!Catalog::new().serves_group_version("authorization.k8s.io", "v1"));
    }
}
