//! Server-side printing: `meta.k8s.io` Tables, as `kubectl get` asks for them.
//!
//! Columns follow the API server's built-in printers (`pkg/printers/internalversion`) for
//! the kinds served here; other kinds get the generic `Name`, `Created At` columns that
//! the API server uses for resources without a printer. Simplified: pod restarts omit the
//! `(5m ago)` suffix and the Status column ignores init containers.

use serde_json::{Value, json};

use super::discovery::ResourceDef;

/// What each row's `object` holds (`includeObject` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IncludeObject {
    /// `PartialObjectMetadata` (the default).
    Metadata,
    /// The whole object.
    Object,
    /// `null`.
    None,
}

impl IncludeObject {
    /// Parses `includeObject`; the API server answers anything else with a 400.
    pub fn parse(raw: Option<&str>) -> Result<Self, String> {
        match raw {
            None | Some("") | Some("Metadata") => Ok(Self::Metadata),
            Some("Object") => Ok(Self::Object),
            Some("None") => Ok(Self::None),
            Some(other) => Err(format!(
                "includeObject: Unsupported value: \"{other}\": supported values: \"Metadata\", \"None\", \"Object\""
            )),
        }
    }
}

/// How a Table response is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableOptions {
    /// `meta.k8s.io/v1` or `meta.k8s.io/v1beta1`.
    pub meta_version: &'static str,
    /// Row object contents.
    pub include: IncludeObject,
}

const NAME_DESC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DESC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.";

fn column(name: &str, ty: &str, format: &str, description: &str, priority: u8) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

/// The column definitions for a resource.
pub(crate) fn columns(res: &ResourceDef) -> Vec<Value> {
    let name = column("Name", "string", "name", NAME_DESC, 0);
    let age = column("Age", "string", "", AGE_DESC, 0);
    if res.custom && !res.columns.is_empty() {
        // A definition's printer columns replace the default Age column.
        let mut columns = vec![name];
        for c in res.columns {
            let priority = u8::try_from(c.priority).unwrap_or(u8::MAX);
            columns.push(column(&c.name, &c.type_, "", &c.description, priority));
        }
        return columns;
    }
    match (res.group, res.plural) {
        ("", "pods") => vec![
            name,
            column(
                "Ready",
                "string",
                "",
                "The aggregate readiness state of this pod for accepting traffic.",
                0,
            ),
            column(
                "Status",
                "string",
                "",
                "The aggregate status of the containers in this pod.",
                0,
            ),
            column(
                "Restarts",
                "string",
                "",
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
                0,
            ),
            age,
            column(
                "IP",
                "string",
                "",
                "podIP is the IP address allocated to the pod.",
                1,
            ),
            column(
                "Node",
                "string",
                "",
                "NodeName indicates in which node this pod is scheduled.",
                1,
            ),
            column(
                "Nominated Node",
                "string",
                "",
                "nominatedNodeName is set only when this pod preempts other pods on the node.",
                1,
            ),
            column(
                "Readiness Gates",
                "string",
                "",
                "If specified, all readiness gates will be evaluated for pod readiness.",
                1,
            ),
        ],
        ("", "namespaces") => vec![
            name,
            column("Status", "string", "", "The status of the namespace", 0),
            age,
        ],
        ("", "configmaps") => vec![
            name,
            column(
                "Data",
                "integer",
                "",
                "Data contains the configuration data.",
                0,
            ),
            age,
        ],
        ("", "secrets") => vec![
            name,
            column(
                "Type",
                "string",
                "",
                "Used to facilitate programmatic handling of secret data.",
                0,
            ),
            column("Data", "integer", "", "Data contains the secret data.", 0),
            age,
        ],
        ("", "serviceaccounts") => vec![
            name,
            column(
                "Secrets",
                "integer",
                "",
                "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
                0,
            ),
            age,
        ],
        ("apps", "deployments") => vec![
            name,
            column(
                "Ready",
                "string",
                "",
                "Number of the pod with ready state",
                0,
            ),
            column(
                "Up-to-date",
                "integer",
                "",
                "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
                0,
            ),
            column(
                "Available",
                "integer",
                "",
                "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
                0,
            ),
            age,
            column(
                "Containers",
                "string",
                "",
                "Names of each container in the template.",
                1,
            ),
            column(
                "Images",
                "string",
                "",
                "Images referenced by each container in the template.",
                1,
            ),
            column(
                "Selector",
                "string",
                "",
                "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.",
                1,
            ),
        ],
        ("apps", "replicasets") => vec![
            name,
            column(
                "Desired",
                "integer",
                "",
                "Replicas is the number of desired pods. This is a pointer to distinguish between explicit zero and unspecified. Defaults to 1. More info: https://kubernetes.io/docs/concepts/workloads/controllers/replicaset",
                0,
            ),
            column(
                "Current",
                "integer",
                "",
                "Replicas is the most recently observed number of non-terminating pods. More info: https://kubernetes.io/docs/concepts/workloads/controllers/replicaset",
                0,
            ),
            column(
                "Ready",
                "integer",
                "",
                "The number of non-terminating pods targeted by this ReplicaSet with a Ready Condition.",
                0,
            ),
            age,
            containers_column(),
            images_column(),
            column(
                "Selector",
                "string",
                "",
                "Selector is a label query over pods that should match the replica count. Label keys and values that must match in order to be controlled by this replica set. It must match the pod template's labels. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#label-selectors",
                1,
            ),
        ],
        ("apps", "statefulsets") => vec![
            name,
            column(
                "Ready",
                "string",
                "",
                "Number of the pod with ready state",
                0,
            ),
            age,
            containers_column(),
            images_column(),
        ],
        _ => vec![name, column("Created At", "date", "", AGE_DESC, 0)],
    }
}

fn containers_column() -> Value {
    column(
        "Containers",
        "string",
        "",
        "Names of each container in the template.",
        1,
    )
}

fn images_column() -> Value {
    column(
        "Images",
        "string",
        "",
        "Images referenced by each container in the template.",
        1,
    )
}

fn str_at<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn or_none(s: &str) -> Value {
    Value::from(if s.is_empty() { "<none>" } else { s })
}

fn count(obj: &Value, pointer: &str) -> usize {
    match obj.pointer(pointer) {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    }
}

fn int_at(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// `kubectl`'s AGE text for a creation timestamp.
fn age(obj: &Value, now: jiff::Timestamp) -> Value {
    match str_at(obj, "/metadata/creationTimestamp").parse::<jiff::Timestamp>() {
        Ok(created) => Value::from(human_duration(now.as_second() - created.as_second())),
        Err(_) => Value::from("<unknown>"),
    }
}

/// apimachinery's `duration.HumanDuration` for a number of seconds.
pub(crate) fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        return if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn pod_cells(pod: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let total = count(pod, "/spec/containers");
    let mut ready = 0;
    let mut restarts = 0;
    let mut has_running = false;
    let mut reason = str_at(pod, "/status/phase").to_owned();
    if !str_at(pod, "/status/reason").is_empty() {
        reason = str_at(pod, "/status/reason").to_owned();
    }
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for cs in statuses.iter().rev() {
        restarts += int_at(cs, "/restartCount");
        let waiting = str_at(cs, "/state/waiting/reason");
        if !waiting.is_empty() {
            reason = waiting.to_owned();
        } else if let Some(term) = cs.pointer("/state/terminated") {
            let term_reason = str_at(term, "/reason");
            reason = if !term_reason.is_empty() {
                term_reason.to_owned()
            } else if int_at(term, "/signal") != 0 {
                format!("Signal:{}", int_at(term, "/signal"))
            } else {
                format!("ExitCode:{}", int_at(term, "/exitCode"))
            };
        } else if cs.get("ready") == Some(&Value::Bool(true))
            && cs.pointer("/state/running").is_some()
        {
            has_running = true;
            ready += 1;
        }
    }
    if reason == "Completed" && has_running {
        reason = "Running".into();
    }
    if pod
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        reason = "Terminating".into();
    }
    let gates = match pod
        .pointer("/spec/readinessGates")
        .and_then(Value::as_array)
    {
        Some(gates) if !gates.is_empty() => {
            let conditions = pod
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let true_gates = gates
                .iter()
                .filter(|g| {
                    conditions
                        .iter()
                        .any(|c| c.get("type") == g.get("conditionType") && c["status"] == "True")
                })
                .count();
            Value::from(format!("{true_gates}/{}", gates.len()))
        }
        _ => Value::from("<none>"),
    };
    vec![
        Value::from(str_at(pod, "/metadata/name")),
        Value::from(format!("{ready}/{total}")),
        Value::from(reason),
        Value::from(restarts.to_string()),
        age(pod, now),
        or_none(str_at(pod, "/status/podIP")),
        or_none(str_at(pod, "/spec/nodeName")),
        or_none(str_at(pod, "/status/nominatedNodeName")),
        gates,
    ]
}

fn deployment_cells(d: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let replicas = d
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let containers = d
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = containers.iter().map(|c| str_at(c, "/name")).collect();
    let images: Vec<&str> = containers.iter().map(|c| str_at(c, "/image")).collect();
    let selector = d
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    vec![
        Value::from(str_at(d, "/metadata/name")),
        Value::from(format!("{}/{replicas}", int_at(d, "/status/readyReplicas"))),
        Value::from(int_at(d, "/status/updatedReplicas")),
        Value::from(int_at(d, "/status/availableReplicas")),
        age(d, now),
        Value::from(names.join(",")),
        Value::from(images.join(",")),
        or_none(&selector),
    ]
}

/// The CONTAINERS and IMAGES cells of a pod template (`layoutContainerCells`).
fn template_cells(obj: &Value) -> [Value; 2] {
    let containers = obj
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let names: Vec<&str> = containers.iter().map(|c| str_at(c, "/name")).collect();
    let images: Vec<&str> = containers.iter().map(|c| str_at(c, "/image")).collect();
    [Value::from(names.join(",")), Value::from(images.join(","))]
}

fn replicaset_cells(rs: &Value, now: jiff::Timestamp) -> Vec<Value> {
    // metav1.FormatLabelSelector.
    let selector = match super::scale::selector_string(rs.pointer("/spec/selector")) {
        Ok(s) if s.is_empty() => "<none>".to_owned(),
        Ok(s) => s,
        Err(_) => "<error>".to_owned(),
    };
    let [names, images] = template_cells(rs);
    vec![
        Value::from(str_at(rs, "/metadata/name")),
        Value::from(
            rs.pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1),
        ),
        Value::from(int_at(rs, "/status/replicas")),
        Value::from(int_at(rs, "/status/readyReplicas")),
        age(rs, now),
        names,
        images,
        Value::from(selector),
    ]
}

fn statefulset_cells(sts: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let replicas = sts
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let [names, images] = template_cells(sts);
    vec![
        Value::from(str_at(sts, "/metadata/name")),
        Value::from(format!(
            "{}/{replicas}",
            int_at(sts, "/status/readyReplicas")
        )),
        age(sts, now),
        names,
        images,
    ]
}

/// The cells of one object's row.
pub(crate) fn cells(res: &ResourceDef, obj: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let name = Value::from(str_at(obj, "/metadata/name"));
    if res.custom && !res.columns.is_empty() {
        let mut cells = vec![name];
        for c in res.columns {
            let value = super::crd::cell(obj, &c.json_path);
            cells.push(match (c.type_.as_str(), &value) {
                ("date", Value::String(_)) => {
                    age(&json!({"metadata": {"creationTimestamp": value}}), now)
                }
                _ => value,
            });
        }
        return cells;
    }
    match (res.group, res.plural) {
        ("", "pods") => pod_cells(obj, now),
        ("", "namespaces") => vec![
            name,
            Value::from(str_at(obj, "/status/phase")),
            age(obj, now),
        ],
        ("", "configmaps") => {
            vec![
                name,
                Value::from(count(obj, "/data") + count(obj, "/binaryData")),
                age(obj, now),
            ]
        }
        ("", "secrets") => vec![
            name,
            Value::from(str_at(obj, "/type")),
            Value::from(count(obj, "/data")),
            age(obj, now),
        ],
        ("", "serviceaccounts") => vec![name, Value::from(count(obj, "/secrets")), age(obj, now)],
        ("apps", "deployments") => deployment_cells(obj, now),
        ("apps", "replicasets") => replicaset_cells(obj, now),
        ("apps", "statefulsets") => statefulset_cells(obj, now),
        _ => vec![
            name,
            Value::from(str_at(obj, "/metadata/creationTimestamp")),
        ],
    }
}

fn row(res: &ResourceDef, obj: &Value, opts: TableOptions, now: jiff::Timestamp) -> Value {
    let mut full = obj.clone();
    if let Some(m) = full.as_object_mut() {
        m.insert("kind".into(), res.kind.into());
        m.insert("apiVersion".into(), res.api_version().into());
    }
    json!({"cells": cells(res, obj, now), "object": row_object(full, opts)})
}

/// What a row carries of its object (`full` has its kind and apiVersion).
fn row_object(full: Value, opts: TableOptions) -> Value {
    match opts.include {
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": opts.meta_version,
            "metadata": full.get("metadata").cloned().unwrap_or_else(|| json!({})),
        }),
        IncludeObject::Object => full,
        // RawExtension with no bytes marshals as null in Go.
        IncludeObject::None => Value::Null,
    }
}

/// The Table of one `Scale` (`kubectl get deployment web --subresource=scale`): the real
/// printer's NAME, DESIRED and AVAILABLE (`printScale`).
pub(crate) fn scale_table(scale: &Value, opts: TableOptions) -> Value {
    let columns = vec![
        column("Name", "string", "name", NAME_DESC, 0),
        column(
            "Desired",
            "integer",
            "",
            "replicas is the desired number of instances for the scaled object.",
            0,
        ),
        column(
            "Available",
            "integer",
            "",
            "replicas is the actual number of observed instances of the scaled object.",
            0,
        ),
    ];
    let cells = vec![
        Value::from(str_at(scale, "/metadata/name")),
        Value::from(int_at(scale, "/spec/replicas")),
        Value::from(int_at(scale, "/status/replicas")),
    ];
    json!({
        "kind": "Table",
        "apiVersion": opts.meta_version,
        "metadata": {"resourceVersion": str_at(scale, "/metadata/resourceVersion")},
        "columnDefinitions": columns,
        "rows": [{"cells": cells, "object": row_object(scale.clone(), opts)}],
    })
}

/// A Table of `objects` with list metadata (`resourceVersion`, and `continue` if set).
/// `with_columns == false` gives `columnDefinitions: []`, as watch events after the first.
pub(crate) fn table(
    res: &ResourceDef,
    objects: &[Value],
    resource_version: &str,
    continue_token: &str,
    opts: TableOptions,
    with_columns: bool,
) -> Value {
    let now = jiff::Timestamp::now();
    let mut metadata = json!({"resourceVersion": resource_version});
    if !continue_token.is_empty() {
        metadata["continue"] = Value::from(continue_token);
    }
    json!({
        "kind": "Table",
        "apiVersion": opts.meta_version,
        "metadata": metadata,
        "columnDefinitions": if with_columns { columns(res) } else { Vec::new() },
        "rows": objects.iter().map(|o| row(res, o, opts, now)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::discovery::find;

    #[test]
    fn human_duration_matches_apimachinery() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 60 * 7, "3h7m"),
            (10 * 3600, "10h"),
            (3 * 86400, "3d"),
            (3 * 86400 + 5 * 3600, "3d5h"),
            (100 * 86400, "100d"),
            (3 * 365 * 86400 + 86400, "3y1d"),
            (10 * 365 * 86400, "10y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
    }

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse()
            .unwrap_or_else(|e| panic!("bad timestamp {s}: {e}"))
    }

    #[test]
    fn pod_cells_like_kubectl() {
        let pods = find("", "v1", "pods").expect("pods");
        let now = ts("2025-01-01T00:05:00Z");
        let running = json!({
            "metadata": {"name": "web", "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
            ]}
        });
        assert_eq!(
            cells(pods, &running, now),
            vec![
                json!("web"),
                json!("1/2"),
                json!("CrashLoopBackOff"),
                json!("3"),
                json!("5m"),
                json!("10.0.0.5"),
                json!("n1"),
                json!("<none>"),
                json!("<none>")
            ]
        );
        let pending = json!({"metadata": {"name": "p", "creationTimestamp": "2025-01-01T00:04:30Z",
            "deletionTimestamp": "2025-01-01T00:04:50Z"}, "spec": {"containers": [{"name": "a"}]}, "status": {"phase": "Pending"}});
        assert_eq!(
            cells(pods, &pending, now)[1..5],
            [json!("0/1"), json!("Terminating"), json!("0"), json!("30s")]
        );
    }

    #[test]
    fn table_shape_and_include_object() {
        let cms = find("", "v1", "configmaps").expect("configmaps");
        let cm = json!({"metadata": {"name": "x", "namespace": "d", "creationTimestamp": "2025-01-01T00:00:00Z"}, "data": {"a": "b"}});
        let t = table(
            cms,
            std::slice::from_ref(&cm),
            "42",
            "",
            TableOptions {
                meta_version: "meta.k8s.io/v1",
                include: IncludeObject::Metadata,
            },
            true,
        );
        assert_eq!(t["kind"], "Table");
        assert_eq!(t["metadata"], json!({"resourceVersion": "42"}));
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["Name", "Data", "Age"]);
        assert_eq!(t["rows"][0]["cells"][1], 1);
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["rows"][0]["object"]["metadata"]["namespace"], "d");
        let full = table(
            cms,
            std::slice::from_ref(&cm),
            "42",
            "tok",
            TableOptions {
                meta_version: "meta.k8s.io/v1",
                include: IncludeObject::Object,
            },
            false,
        );
        assert_eq!(full["rows"][0]["object"]["kind"], "ConfigMap");
        assert_eq!(full["rows"][0]["object"]["data"]["a"], "b");
        assert_eq!(full["columnDefinitions"], json!([]));
        assert_eq!(full["metadata"]["continue"], "tok");
        let none = table(
            cms,
            &[cm],
            "42",
            "",
            TableOptions {
                meta_version: "meta.k8s.io/v1",
                include: IncludeObject::None,
            },
            true,
        );
        assert_eq!(none["rows"][0]["object"], Value::Null);
        assert!(IncludeObject::parse(Some("Everything")).is_err());
    }

    #[test]
    fn column_sets_per_kind() {
        let cases = [
            ("", "namespaces", vec!["Name", "Status", "Age"]),
            ("", "secrets", vec!["Name", "Type", "Data", "Age"]),
            (
                "",
                "pods",
                vec![
                    "Name",
                    "Ready",
                    "Status",
                    "Restarts",
                    "Age",
                    "IP",
                    "Node",
                    "Nominated Node",
                    "Readiness Gates",
                ],
            ),
        ];
        let apps = [
            (
                "apps",
                "replicasets",
                vec![
                    "Name",
                    "Desired",
                    "Current",
                    "Ready",
                    "Age",
                    "Containers",
                    "Images",
                    "Selector",
                ],
            ),
            (
                "apps",
                "statefulsets",
                vec!["Name", "Ready", "Age", "Containers", "Images"],
            ),
        ];
        for (group, plural, want) in cases.into_iter().chain(apps) {
            let res = find(group, "v1", plural).expect("resource");
            let names: Vec<String> = columns(res)
                .iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect();
            assert_eq!(names, want, "{plural}");
        }
        let pods = find("", "v1", "pods").expect("pods");
        let wide: Vec<u64> = columns(pods)
            .iter()
            .filter_map(|c| c["priority"].as_u64())
            .collect();
        assert_eq!(wide, [0, 0, 0, 0, 0, 1, 1, 1, 1]);
    }
}
