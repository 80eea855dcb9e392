//! The pods on this node, indexed by pod UID and container id.
//!
//! A [`PodSource`] feeds [`PodEvent`]s into a [`PodStore`]: the kube-rs source watches Pods
//! with `spec.nodeName=<node>` (the gateway only ever sees connections from its own node, so
//! it never holds the whole cluster's pods); tests use the channel source. Lookups happen on
//! the proxy's accept path and only take a read lock.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, RwLock},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::IdentityError;

/// A change to the set of pods on this node.
#[derive(Debug, Clone)]
pub enum PodEvent {
    /// A pod was created or changed.
    Apply(Pod),
    /// A pod was deleted.
    Delete(Pod),
    /// The complete set of pods after a (re)list; everything else is gone.
    Resync(Vec<Pod>),
}

/// What the store knows about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.serviceAccountName` ("default" when unset, as the API server defaults it).
    pub service_account: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// Container id (without the `<runtime>://` scheme) → container name, over regular,
    /// init and ephemeral containers.
    pub containers: HashMap<String, String>,
    /// The pod's own addresses (`status.podIPs`); empty for host-network pods, whose
    /// address is the node's and says nothing about which process connects.
    pub ips: Vec<std::net::IpAddr>,
}

impl PodInfo {
    /// Extracts what identity needs from a Pod; `None` without a uid, name or namespace.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let mut containers = HashMap::new();
        if let Some(status) = &pod.status {
            let lists: [&Option<Vec<ContainerStatus>>; 3] = [
                &status.container_statuses,
                &status.init_container_statuses,
                &status.ephemeral_container_statuses,
            ];
            for statuses in lists.into_iter().flatten() {
                for cs in statuses {
                    if let Some(id) = cs.container_id.as_deref().map(strip_scheme)
                        && !id.is_empty()
                    {
                        containers.insert(id.to_owned(), cs.name.clone());
                    }
                }
            }
        }
        Some(Self {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            uid: meta.uid.clone()?,
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            containers,
            ips: pod_ips(pod),
        })
    }
}

/// The addresses of a pod that has its own network namespace.
fn pod_ips(pod: &Pod) -> Vec<std::net::IpAddr> {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Vec::new();
    }
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<std::net::IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

/// `containerd://abc` → `abc`; a bare id is returned as is.
fn strip_scheme(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, rest)| rest)
}

#[derive(Debug, Default)]
struct Index {
    by_uid: HashMap<String, Arc<PodInfo>>,
    by_container: HashMap<String, String>,
    by_ip: HashMap<std::net::IpAddr, String>,
}

impl Index {
    fn insert(&mut self, info: PodInfo) {
        self.remove(&info.uid);
        for id in info.containers.keys() {
            self.by_container.insert(id.clone(), info.uid.clone());
        }
        for ip in &info.ips {
            self.by_ip.insert(*ip, info.uid.clone());
        }
        self.by_uid.insert(info.uid.clone(), Arc::new(info));
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.by_uid.remove(uid) {
            for id in old.containers.keys() {
                // Only drop the mapping if no newer pod claimed the id.
                if self.by_container.get(id).is_some_and(|u| u == uid) {
                    self.by_container.remove(id);
                }
            }
            for ip in &old.ips {
                if self.by_ip.get(ip).is_some_and(|u| u == uid) {
                    self.by_ip.remove(ip);
                }
            }
        }
    }
}

/// A cheaply clonable, shared index of this node's pods.
#[derive(Debug, Clone, Default)]
pub struct PodStore {
    index: Arc<RwLock<Index>>,
    // Set once a first complete list has been applied; lookups before that are not misses
    // worth alarming about.
    synced: Arc<std::sync::atomic::AtomicBool>,
    // Set when a watch feeds the store, so a list is to come.
    watched: Arc<std::sync::atomic::AtomicBool>,
    // Woken on every change, for connections waiting to name their pod.
    changed: Arc<tokio::sync::Notify>,
    // The watch's last error, from when it failed until its next event: meanwhile a pod
    // missing from the store may just be one the watch has not delivered.
    failing: Arc<std::sync::atomic::AtomicBool>,
    watch_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl PodStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event.
    pub fn handle(&self, event: PodEvent) {
        match event {
            PodEvent::Apply(pod) => self.apply(&pod),
            PodEvent::Delete(pod) => self.delete(&pod),
            PodEvent::Resync(pods) => self.resync(&pods),
        }
    }

    /// Adds or replaces a pod.
    pub fn apply(&self, pod: &Pod) {
        let Some(info) = PodInfo::from_pod(pod) else {
            tracing::debug!(name = ?pod.metadata.name, "pod without uid/name/namespace ignored");
            return;
        };
        self.write().insert(info);
        self.changed.notify_waiters();
    }

    /// Removes a pod.
    pub fn delete(&self, pod: &Pod) {
        if let Some(uid) = pod.metadata.uid.as_deref() {
            self.write().remove(uid);
        }
    }

    /// Replaces the whole set.
    pub fn resync(&self, pods: &[Pod]) {
        let mut fresh = Index::default();
        for info in pods.iter().filter_map(PodInfo::from_pod) {
            fresh.insert(info);
        }
        *self.write() = fresh;
        self.synced
            .store(true, std::sync::atomic::Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether a complete list has been applied.
    pub fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The pod with this UID.
    pub fn by_uid(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.read().by_uid.get(uid).cloned()
    }

    /// The pod (with its own network namespace) that has this address.
    pub fn by_ip(&self, ip: std::net::IpAddr) -> Option<Arc<PodInfo>> {
        let index = self.read();
        let uid = index.by_ip.get(&ip)?;
        index.by_uid.get(uid).cloned()
    }

    /// The pod running the container with this id (no scheme), and the container's name.
    pub fn by_container(&self, container_id: &str) -> Option<(Arc<PodInfo>, String)> {
        let index = self.read();
        let uid = index.by_container.get(container_id)?;
        let pod = index.by_uid.get(uid)?.clone();
        let name = pod.containers.get(container_id)?.clone();
        Some((pod, name))
    }

    /// The pod and container for a parsed cgroup: the pod by UID, the container name when its
    /// id appears in the pod's statuses (a sandbox or a container whose status has not been
    /// reported yet has none). Falls back to the container id alone.
    pub fn lookup(
        &self,
        pod_uid: &str,
        container_id: Option<&str>,
    ) -> Option<(Arc<PodInfo>, Option<String>)> {
        if let Some(pod) = self.by_uid(pod_uid) {
            let container = container_id.and_then(|id| pod.containers.get(id).cloned());
            return Some((pod, container));
        }
        let (pod, name) = self.by_container(container_id?)?;
        Some((pod, Some(name)))
    }

    /// Number of pods held.
    pub fn len(&self) -> usize {
        self.read().by_uid.len()
    }

    /// Whether the store holds no pods.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Says that a watch feeds this store: until its first list arrives
    /// ([`PodStore::awaits_list`]), a pod missing from it may just not be listed yet.
    pub fn expect_list(&self) {
        self.watched
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether a watch feeds this store and its first complete list has not arrived.
    pub fn awaits_list(&self) -> bool {
        self.watched.load(std::sync::atomic::Ordering::Acquire) && !self.is_synced()
    }

    /// Says that the watch feeding this store failed (it retries): until its next event,
    /// [`PodStore::watch_error`] returns `error`.
    pub fn watch_failed(&self, error: impl std::fmt::Display) {
        *self.error_slot() = Some(error.to_string());
        self.failing
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Says that the watch delivered an event again: it is current.
    pub fn watch_ok(&self) {
        if self.failing.load(std::sync::atomic::Ordering::Acquire) {
            self.failing
                .store(false, std::sync::atomic::Ordering::Release);
            *self.error_slot() = None;
        }
    }

    /// The watch's error, while it fails (from its error to its next event).
    pub fn watch_error(&self) -> Option<String> {
        if !self.failing.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.error_slot().clone()
    }

    fn error_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.watch_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a watch feeds this store.
    pub fn is_watched(&self) -> bool {
        self.watched.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits up to `wait`, rechecking on every change of the store, until `ready` holds;
    /// returns whether it does.
    pub async fn wait_until(&self, ready: impl Fn() -> bool, wait: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check, so a change in between is not missed.
            let changed = self.changed.notified();
            if ready() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return ready();
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Something that keeps a [`PodStore`] up to date until it is dropped or fails.
pub trait PodSource: Send + 'static {
    /// Feeds events into `store` until the source ends.
    fn run(self, store: PodStore) -> impl Future<Output = Result<(), IdentityError>> + Send;
}

/// Watches the Pods scheduled to one node through the API server (a kube-rs watcher with a
/// `spec.nodeName` field selector; it relists and resumes by itself).
#[derive(Clone)]
pub struct KubePodSource {
    client: kube::Client,
    node: String,
    errors: prometheus_client::metrics::counter::Counter,
    watch_timeout: Option<u32>,
}

impl std::fmt::Debug for KubePodSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePodSource")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl KubePodSource {
    /// A source for the pods on `node`.
    pub fn new(client: kube::Client, node: impl Into<String>) -> Self {
        Self {
            client,
            node: node.into(),
            errors: Default::default(),
            watch_timeout: None,
        }
    }

    /// Counts the watch's errors in `errors` (`chaperone_pod_watch_errors`).
    pub fn counting_errors_in(
        mut self,
        errors: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        self.errors = errors;
        self
    }

    /// Asks the API server to end each watch after `seconds` (kube-rs's default is 290 s);
    /// the watch is then opened again from where it was.
    pub fn with_watch_timeout(mut self, seconds: u32) -> Self {
        self.watch_timeout = Some(seconds);
        self
    }

    /// The watcher configuration (exposed for tests).
    pub fn watcher_config(node: &str) -> kube::runtime::watcher::Config {
        kube::runtime::watcher::Config::default().fields(&format!("spec.nodeName={node}"))
    }
}

impl PodSource for KubePodSource {
    async fn run(self, store: PodStore) -> Result<(), IdentityError> {
        use kube::runtime::watcher;
        let api: kube::Api<Pod> = kube::Api::all(self.client);
        store.expect_list();
        let mut backoff = POD_WATCH_BACKOFF_MIN;
        // After an error the watch starts over with a fresh list: kube-rs would resume
        // from where it stopped without a sign, and until the list is complete again a
        // pod the store does not know may be one the watch missed (see `watch_error`).
        loop {
            let mut config = Self::watcher_config(&self.node);
            if let Some(seconds) = self.watch_timeout {
                config = config.timeout(seconds);
            }
            let mut events = watcher(api.clone(), config).boxed();
            let mut relist: Option<Vec<Pod>> = None;
            let error = loop {
                let Some(event) = events.next().await else {
                    return Err(IdentityError::PodWatchEnded {
                        node: self.node.clone(),
                    });
                };
                // Current again once an event has been applied (a relist: once complete).
                match event {
                    Ok(watcher::Event::Init) => relist = Some(Vec::new()),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let Some(buffer) = relist.as_mut() {
                            buffer.push(pod);
                        } else {
                            store.apply(&pod);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        let pods = relist.take().unwrap_or_default();
                        tracing::info!(node = %self.node, pods = pods.len(), "pod list synced");
                        store.resync(&pods);
                        store.watch_ok();
                        backoff = POD_WATCH_BACKOFF_MIN;
                    }
                    Ok(watcher::Event::Apply(pod)) => {
                        store.apply(&pod);
                        store.watch_ok();
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        store.delete(&pod);
                        store.watch_ok();
                    }
                    Err(e) => break e,
                }
            };
            // The store keeps serving what it has; pods it does not know are not named
            // until the watch has listed again.
            self.errors.inc();
            store.watch_failed(&error);
            tracing::warn!(node = %self.node, error = %error, retry_in = ?backoff, "pod watch error; listing again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(POD_WATCH_BACKOFF_MAX);
        }
    }
}

/// First wait before the pod watch lists again after an error; doubled per failure.
const POD_WATCH_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(500);
/// Longest wait between the pod watch's attempts.
const POD_WATCH_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// A source fed through a channel (tests and the demo).
#[derive(Debug)]
pub struct ChannelPodSource {
    events: tokio::sync::mpsc::Receiver<PodEvent>,
}

impl ChannelPodSource {
    /// A source and the sender that feeds it.
    pub fn new(capacity: usize) -> (tokio::sync::mpsc::Sender<PodEvent>, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (tx, Self { events: rx })
    }
}

impl PodSource for ChannelPodSource {
    async fn run(mut self, store: PodStore) -> Result<(), IdentityError> {
        while let Some(event) = self.events.recv().await {
            store.handle(event);
        }
        Ok(())
    }
}

/// Builds Pod objects for tests.
#[cfg(test)]
pub(crate) mod fake {
    use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    /// A running pod with one container per `(name, "<runtime>://<id>")`.
    pub fn pod(
        namespace: &str,
        name: &str,
        uid: &str,
        service_account: &str,
        containers: &[(&str, &str)],
    ) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_owned()),
                name: Some(name.to_owned()),
                uid: Some(uid.to_owned()),
                labels: Some([("app".to_owned(), name.to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(service_account.to_owned()),
                node_name: Some("node-a".to_owned()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                container_statuses: Some(containers.iter().map(|(n, id)| status(n, id)).collect()),
                ..PodStatus::default()
            }),
        }
    }

    /// A container status with a container id.
    pub fn status(name: &str, container_id: &str) -> ContainerStatus {
        ContainerStatus {
            name: name.to_owned(),
            container_id: Some(container_id.to_owned()),
            ready: true,
            restart_count: 0,
            image: "agent:latest".to_owned(),
            image_id: String::new(),
            ..ContainerStatus::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::*, *};

    const UID: &str = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9";
    fn id(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    #[test]
    fn pod_churn_create_restart_delete() {
        let store = PodStore::new();
        let first = id('a');
        let pod1 = pod(
            "agents",
            "agent-0",
            UID,
            "agent",
            &[("main", &format!("containerd://{first}"))],
        );
        store.apply(&pod1);
        let (info, container) = store.lookup(UID, Some(&first)).expect("pod after create");
        assert_eq!(
            (
                info.namespace.as_str(),
                info.name.as_str(),
                info.service_account.as_str()
            ),
            ("agents", "agent-0", "agent")
        );
        assert_eq!(container.as_deref(), Some("main"));
        assert_eq!(info.labels.get("app").map(String::as_str), Some("agent-0"));

        // The container restarts: a new id replaces the old one.
        let second = id('b');
        let mut restarted = pod1.clone();
        if let Some(status) = restarted.status.as_mut() {
            status.container_statuses = Some(vec![super::fake::status(
                "main",
                &format!("containerd://{second}"),
            )]);
        }
        store.apply(&restarted);
        assert_eq!(
            store
                .lookup(UID, Some(&second))
                .and_then(|(_, c)| c)
                .as_deref(),
            Some("main")
        );
        assert_eq!(
            store.by_container(&first),
            None,
            "the old container id must not resolve after the restart"
        );
        // By uid the pod is still found; the old container's name is not.
        let (_, stale) = store.lookup(UID, Some(&first)).expect("pod by uid");
        assert_eq!(stale, None);

        store.delete(&restarted);
        assert!(
            store.lookup(UID, Some(&second)).is_none(),
            "deleted pod still resolves"
        );
        assert!(store.is_empty());
    }

    #[test]
    fn pods_are_found_by_their_own_addresses_only() {
        use k8s_openapi::api::core::v1::PodIP;
        let store = PodStore::new();
        let mut p = pod("agents", "agent-0", UID, "agent", &[]);
        if let Some(status) = p.status.as_mut() {
            status.pod_ip = Some("10.1.0.7".to_owned());
            status.pod_ips = Some(vec![
                PodIP {
                    ip: "10.1.0.7".to_owned(),
                },
                PodIP {
                    ip: "fd00::7".to_owned(),
                },
            ]);
        }
        store.apply(&p);
        for ip in ["10.1.0.7", "fd00::7"] {
            let found = store.by_ip(ip.parse().unwrap()).expect(ip);
            assert_eq!(found.name, "agent-0");
        }
        assert!(store.by_ip("10.1.0.8".parse().unwrap()).is_none());
        // A host-network pod shares the node's address: it is not indexed by it.
        let mut host = p.clone();
        host.metadata.uid = Some("other".to_owned());
        host.metadata.name = Some("node-agent".to_owned());
        if let Some(spec) = host.spec.as_mut() {
            spec.host_network = Some(true);
        }
        if let Some(status) = host.status.as_mut() {
            status.pod_ip = Some("192.168.1.5".to_owned());
            status.pod_ips = None;
        }
        store.apply(&host);
        assert!(store.by_ip("192.168.1.5".parse().unwrap()).is_none());
        store.delete(&p);
        assert!(store.by_ip("10.1.0.7".parse().unwrap()).is_none());
    }

    #[test]
    fn init_and_ephemeral_containers_and_runtimes() {
        let store = PodStore::new();
        let mut p = pod(
            "ns",
            "p",
            UID,
            "sa",
            &[("app", &format!("cri-o://{}", id('1')))],
        );
        if let Some(status) = p.status.as_mut() {
            status.init_container_statuses = Some(vec![super::fake::status(
                "init",
                &format!("cri-o://{}", id('2')),
            )]);
            status.ephemeral_container_statuses = Some(vec![super::fake::status(
                "debugger",
                &format!("docker://{}", id('3')),
            )]);
        }
        store.apply(&p);
        for (cid, want) in [(id('1'), "app"), (id('2'), "init"), (id('3'), "debugger")] {
            let (pod, name) = store
                .by_container(&cid)
                .unwrap_or_else(|| panic!("{want} not found"));
            assert_eq!((pod.name.as_str(), name.as_str()), ("p", want));
        }
        // Sandbox (pause) containers never appear in statuses: pod known, container not.
        let (pod, container) = store.lookup(UID, Some(&id('9'))).expect("pod by uid");
        assert_eq!((pod.name.as_str(), container), ("p", None));
        // Lookup by container id works when the uid is unknown (e.g. a static pod mirror).
        let (pod, container) = store
            .lookup("ffffffff-ffff-ffff-ffff-ffffffffffff", Some(&id('1')))
            .expect("by container id");
        assert_eq!(
            (pod.name.as_str(), container.as_deref()),
            ("p", Some("app"))
        );
    }

    #[tokio::test]
    async fn waiting_for_a_pod_ends_when_the_list_names_it_or_at_the_deadline() {
        use std::time::Duration;
        let store = PodStore::new();
        assert!(!store.awaits_list(), "no watch: nothing to wait for");
        store.expect_list();
        assert!(store.awaits_list());
        let known = |s: &PodStore| s.is_synced() && s.by_uid(UID).is_some();
        // Nothing comes: false at the deadline.
        let started = tokio::time::Instant::now();
        assert!(
            !store
                .wait_until(|| known(&store), Duration::from_millis(200))
                .await
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        // The list comes while it waits: true at once, long before the deadline.
        let listing = store.clone();
        let list = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            listing.resync(&[pod("ns", "p", UID, "sa", &[])]);
        });
        let started = tokio::time::Instant::now();
        assert!(
            store
                .wait_until(|| known(&store), Duration::from_secs(30))
                .await
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        list.await.unwrap();
        assert!(!store.awaits_list());
    }

    #[test]
    fn a_failing_watch_is_reported_until_its_next_event() {
        let store = PodStore::new();
        assert_eq!(store.watch_error(), None);
        store.watch_failed("connection refused");
        store.watch_failed("500 Internal Server Error");
        assert_eq!(
            store.watch_error().as_deref(),
            Some("500 Internal Server Error"),
            "the last error"
        );
        // Applying pods does not say the watch is back: only the source knows that.
        store.apply(&pod("ns", "p", UID, "sa", &[]));
        assert!(store.watch_error().is_some());
        store.watch_ok();
        assert_eq!(store.watch_error(), None);
    }

    #[test]
    fn resync_replaces_everything_and_defaults_apply() {
        let store = PodStore::new();
        store.apply(&pod(
            "a",
            "gone",
            "11111111-1111-1111-1111-111111111111",
            "x",
            &[],
        ));
        assert!(!store.is_synced());
        let mut kept = pod("b", "kept", UID, "x", &[]);
        if let Some(spec) = kept.spec.as_mut() {
            spec.service_account_name = None;
        }
        // Pods without identifying metadata are skipped, not stored half-empty.
        let mut nameless = pod(
            "c",
            "nameless",
            "22222222-2222-2222-2222-222222222222",
            "x",
            &[],
        );
        nameless.metadata.name = None;
        store.resync(&[kept, nameless]);
        assert!(store.is_synced());
        assert_eq!(store.len(), 1);
        assert!(
            store
                .by_uid("11111111-1111-1111-1111-111111111111")
                .is_none()
        );
        assert_eq!(
            store
                .by_uid(UID)
                .map(|p| p.service_account.clone())
                .as_deref(),
            Some("default")
        );
    }

    #[tokio::test]
    async fn channel_source_feeds_the_store() {
        let store = PodStore::new();
        let (tx, source) = ChannelPodSource::new(8);
        let task = tokio::spawn(source.run(store.clone()));
        let p = pod(
            "ns",
            "p",
            UID,
            "sa",
            &[("c", &format!("containerd://{}", id('c')))],
        );
        tx.send(PodEvent::Resync(vec![p.clone()]))
            .await
            .expect("send");
        tx.send(PodEvent::Delete(p)).await.expect("send");
        drop(tx);
        task.await.expect("join").expect("source ended cleanly");
        assert!(store.is_synced());
        assert!(store.is_empty());
    }

    #[test]
    fn watcher_selects_this_node() {
        let config = KubePodSource::watcher_config("node-a");
        assert_eq!(
            config.field_selector.as_deref(),
            Some("spec.nodeName=node-a")
        );
    }
}
