//! Parsing kubelet cgroup v2 paths into pod and container ids.
//!
//! The kubelet names pod cgroups one of two ways, depending on its cgroup driver:
//!
//! * systemd: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/<rt>-<id>.scope`,
//!   where the uid's dashes become underscores (systemd reserves `-` for slice nesting) and
//!   Guaranteed pods have no QoS slice (`kubepods-pod<uid>.slice`);
//! * cgroupfs: `kubepods/<qos>/pod<uid>/<id>`, Guaranteed pods again without the QoS level.
//!
//! Either may sit below another prefix (kind nodes use `kubelet.slice/kubelet-kubepods.slice`,
//! docker-in-docker nodes `docker/<id>/kubepods`), and a container may create cgroups of its
//! own below its scope, so the parser looks for the pod segment anywhere in the path and
//! ignores what follows the container segment.

/// The pod's QoS class as encoded in its cgroup path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QosClass {
    /// No QoS level in the path.
    Guaranteed,
    /// `burstable`.
    Burstable,
    /// `besteffort`.
    BestEffort,
}

/// The container runtime named by a container cgroup's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope`.
    Containerd,
    /// `crio-<id>.scope` (or `crio-<id>` under cgroupfs).
    CriO,
    /// `docker-<id>.scope`.
    Docker,
    /// A bare id under the cgroupfs driver: the path does not say which runtime.
    Unknown,
}

impl Runtime {
    /// The scheme Kubernetes uses in `containerStatuses[].containerID` (`containerd://<id>`).
    pub fn scheme(self) -> Option<&'static str> {
        match self {
            Self::Containerd => Some("containerd"),
            Self::CriO => Some("cri-o"),
            Self::Docker => Some("docker"),
            Self::Unknown => None,
        }
    }
}

/// What the cgroup below the pod cgroup is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ContainerCgroup {
    /// The pod cgroup itself (no container segment).
    PodLevel,
    /// A container (application, init, ephemeral or the pause sandbox; the path alone cannot
    /// tell a sandbox apart, the pod's container statuses can).
    Container {
        /// The container id as the runtime reports it (64 hex digits in practice).
        id: String,
        /// The runtime, from the cgroup name's prefix.
        runtime: Runtime,
    },
    /// CRI-O's `crio-conmon-<id>` monitor process: part of the pod, not a container.
    Conmon {
        /// The id of the container it monitors.
        id: String,
    },
    /// A segment below the pod cgroup that no runtime we know produces.
    Other(String),
}

/// A pod cgroup path taken apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodCgroup {
    /// The pod's UID with dashes (`metadata.uid`).
    pub pod_uid: String,
    /// The QoS class.
    pub qos: QosClass,
    /// The container part below the pod cgroup.
    pub container: ContainerCgroup,
}

impl PodCgroup {
    /// The container id, when the cgroup is a container's (not for conmon or the pod level).
    pub fn container_id(&self) -> Option<&str> {
        match &self.container {
            ContainerCgroup::Container { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// Parses a cgroup v2 path (absolute or relative to the cgroup2 mount) into its pod and
/// container parts; `None` when the path is not inside a Kubernetes pod cgroup.
pub fn parse_pod_cgroup(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, segment) in segments.iter().enumerate() {
        if let Some((uid, qos)) = systemd_pod_slice(segment) {
            return Some(PodCgroup {
                pod_uid: uid,
                qos,
                container: segments
                    .get(i + 1)
                    .map_or(ContainerCgroup::PodLevel, |s| systemd_container(s)),
            });
        }
        if *segment == "kubepods"
            && let Some(found) = cgroupfs_pod(&segments[i + 1..])
        {
            return Some(found);
        }
    }
    None
}

/// `[<prefix>-]kubepods[-<qos>]-pod<uid_with_underscores>.slice`.
fn systemd_pod_slice(segment: &str) -> Option<(String, QosClass)> {
    let stem = segment.strip_suffix(".slice")?;
    let (parent, uid) = stem.rsplit_once("-pod")?;
    let qos = if parent == "kubepods" || parent.ends_with("-kubepods") {
        QosClass::Guaranteed
    } else if parent == "kubepods-burstable" || parent.ends_with("-kubepods-burstable") {
        QosClass::Burstable
    } else if parent == "kubepods-besteffort" || parent.ends_with("-kubepods-besteffort") {
        QosClass::BestEffort
    } else {
        return None;
    };
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some((uid, qos))
}

fn systemd_container(segment: &str) -> ContainerCgroup {
    let Some(stem) = segment.strip_suffix(".scope") else {
        return ContainerCgroup::Other(segment.to_owned());
    };
    // `crio-conmon-` must be tried before `crio-`.
    if let Some(id) = stem
        .strip_prefix("crio-conmon-")
        .filter(|id| is_container_id(id))
    {
        return ContainerCgroup::Conmon { id: id.to_owned() };
    }
    let prefixes = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
    ];
    for (prefix, runtime) in prefixes {
        if let Some(id) = stem.strip_prefix(prefix).filter(|id| is_container_id(id)) {
            return ContainerCgroup::Container {
                id: id.to_owned(),
                runtime,
            };
        }
    }
    ContainerCgroup::Other(segment.to_owned())
}

/// After a `kubepods` segment: `[<qos>/]pod<uid>[/<container>]`.
fn cgroupfs_pod(rest: &[&str]) -> Option<PodCgroup> {
    let (qos, rest) = match rest.first() {
        Some(&"burstable") => (QosClass::Burstable, &rest[1..]),
        Some(&"besteffort") => (QosClass::BestEffort, &rest[1..]),
        _ => (QosClass::Guaranteed, rest),
    };
    let uid = rest.first()?.strip_prefix("pod")?;
    if !is_uid(uid) {
        return None;
    }
    let container = rest.get(1).map_or(ContainerCgroup::PodLevel, |s| {
        if let Some(id) = s
            .strip_prefix("crio-conmon-")
            .filter(|id| is_container_id(id))
        {
            ContainerCgroup::Conmon { id: id.to_owned() }
        } else if let Some(id) = s.strip_prefix("crio-").filter(|id| is_container_id(id)) {
            ContainerCgroup::Container {
                id: id.to_owned(),
                runtime: Runtime::CriO,
            }
        } else if is_container_id(s) {
            ContainerCgroup::Container {
                id: (*s).to_owned(),
                runtime: Runtime::Unknown,
            }
        } else {
            ContainerCgroup::Other((*s).to_owned())
        }
    });
    Some(PodCgroup {
        pod_uid: uid.to_owned(),
        qos,
        container,
    })
}

/// A UUID in its 8-4-4-4-12 text form (static pods use a 32-hex config hash instead).
fn is_uid(s: &str) -> bool {
    let hex = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = s.split('-').collect();
    match parts.as_slice() {
        [a, b, c, d, e] => {
            [a.len(), b.len(), c.len(), d.len(), e.len()] == [8, 4, 4, 4, 12]
                && parts.iter().all(|p| hex(p))
        }
        [single] => single.len() == 32 && hex(single),
        _ => false,
    }
}

/// Runtimes use 64 hex digits; accept any reasonably long hex string so a runtime with
/// shorter ids still resolves, but not arbitrary words.
fn is_container_id(s: &str) -> bool {
    (12..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7f3a1c2e-9b4d-4e8f-a1b2-c3d4e5f60718";
    const UID_: &str = "7f3a1c2e_9b4d_4e8f_a1b2_c3d4e5f60718";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn container(runtime: Runtime) -> ContainerCgroup {
        ContainerCgroup::Container {
            id: ID.to_owned(),
            runtime,
        }
    }

    #[test]
    fn real_world_paths() {
        use ContainerCgroup::PodLevel;
        use QosClass::*;
        use Runtime::*;
        let cases: Vec<(String, Option<(QosClass, ContainerCgroup)>)> = vec![
            // systemd driver, containerd, each QoS class.
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                Some((BestEffort, container(Containerd))),
            ),
            (
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                Some((Burstable, container(Containerd))),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                Some((Guaranteed, container(Containerd))),
            ),
            // systemd driver, CRI-O container and its conmon.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"
                ),
                Some((Burstable, container(CriO))),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"
                ),
                Some((Burstable, ContainerCgroup::Conmon { id: ID.to_owned() })),
            ),
            // CRI-O with a container that manages its own sub-cgroups.
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope/container"),
                Some((Guaranteed, container(CriO))),
            ),
            // systemd driver, docker (cri-dockerd).
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope"
                ),
                Some((BestEffort, container(Docker))),
            ),
            // The pod cgroup itself.
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
                ),
                Some((BestEffort, PodLevel)),
            ),
            // kind node: kubelet cgroup root /kubelet with the systemd driver.
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                Some((BestEffort, container(Containerd))),
            ),
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                Some((Guaranteed, container(Containerd))),
            ),
            // Nested under a container of the host (kind with cgroupns=host).
            (
                format!(
                    "/system.slice/docker-{ID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                Some((Burstable, container(Containerd))),
            ),
            // cgroupfs driver.
            (
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                Some((BestEffort, container(Unknown))),
            ),
            (
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                Some((Burstable, container(Unknown))),
            ),
            (
                format!("/kubepods/pod{UID}/{ID}"),
                Some((Guaranteed, container(Unknown))),
            ),
            (format!("kubepods/pod{UID}"), Some((Guaranteed, PodLevel))),
            (
                format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
                Some((Burstable, container(CriO))),
            ),
            (
                format!("/kubepods/burstable/pod{UID}/crio-conmon-{ID}"),
                Some((Burstable, ContainerCgroup::Conmon { id: ID.to_owned() })),
            ),
            // cgroupfs under kind's /kubelet root and under docker-in-docker.
            (
                format!("/kubelet/kubepods/besteffort/pod{UID}/{ID}"),
                Some((BestEffort, container(Unknown))),
            ),
            (
                format!("/docker/{ID}/kubepods/pod{UID}/{ID}"),
                Some((Guaranteed, container(Unknown))),
            ),
            // Something below the pod that is no runtime's.
            (
                format!("/kubepods/pod{UID}/not-a-container"),
                Some((
                    Guaranteed,
                    ContainerCgroup::Other("not-a-container".to_owned()),
                )),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-short.scope"),
                Some((
                    Guaranteed,
                    ContainerCgroup::Other("cri-containerd-short.scope".to_owned()),
                )),
            ),
            // Not pods.
            ("/".to_owned(), None),
            ("".to_owned(), None),
            ("/system.slice/containerd.service".to_owned(), None),
            (
                "/user.slice/user-1000.slice/session-3.scope".to_owned(),
                None,
            ),
            ("/kubepods.slice".to_owned(), None),
            ("/kubepods.slice/kubepods-besteffort.slice".to_owned(), None),
            ("/kubepods/besteffort".to_owned(), None),
            ("/kubepods/burstable/podnot-a-uid/abc".to_owned(), None),
            (format!("/kubepods.slice/notkubepods-pod{UID_}.slice"), None),
            (
                format!("/kubepods.slice/kubepods-weird-pod{UID_}.slice"),
                None,
            ),
            (format!("/system.slice/pod{UID}/{ID}"), None),
        ];
        for (path, want) in cases {
            let got = parse_pod_cgroup(&path).map(|p| {
                assert_eq!(p.pod_uid, UID, "{path}: pod uid");
                (p.qos, p.container)
            });
            assert_eq!(got, want, "{path}");
        }
    }

    #[test]
    fn static_pod_uids_are_config_hashes() {
        let hash = "0af1c2d3e4f5a6b7c8d9e0f1a2b3c4d5";
        let p = parse_pod_cgroup(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{ID}.scope"))
            .expect("static pod path parses");
        assert_eq!(p.pod_uid, hash);
        assert_eq!(p.container_id(), Some(ID));
    }

    #[test]
    fn runtime_schemes_match_container_statuses() {
        assert_eq!(Runtime::Containerd.scheme(), Some("containerd"));
        assert_eq!(Runtime::CriO.scheme(), Some("cri-o"));
        assert_eq!(Runtime::Docker.scheme(), Some("docker"));
        assert_eq!(Runtime::Unknown.scheme(), None);
    }
}
