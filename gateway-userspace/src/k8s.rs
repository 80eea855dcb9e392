//! Where the API server is: the addresses the kernel redirect must catch.
//!
//! A pod can reach the API server through the `default/kubernetes` Service (ClusterIP and
//! port), directly through its endpoint addresses (EndpointSlices labelled
//! `kubernetes.io/service-name=kubernetes`), or through an external name (a load
//! balancer). All of them become redirect targets, kept current as they change.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use futures_util::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::{WatchStreamExt as _, watcher};

use crate::{drain::DrainWatcher, ebpf::Interceptor};

/// The redirect targets a `kubernetes` Service and its EndpointSlices stand for.
pub fn targets_from(service: Option<&Service>, slices: &[EndpointSlice]) -> BTreeSet<SocketAddr> {
    let mut targets = BTreeSet::new();
    if let Some(spec) = service.and_then(|s| s.spec.as_ref()) {
        let ips = spec.cluster_ips.clone().unwrap_or_default();
        let ips = if ips.is_empty() {
            spec.cluster_ip.iter().cloned().collect()
        } else {
            ips
        };
        for port in spec.ports.iter().flatten() {
            let Ok(port_number) = u16::try_from(port.port) else {
                continue;
            };
            targets.extend(
                ips.iter()
                    .filter_map(|ip| ip.parse().ok())
                    .map(|ip| SocketAddr::new(ip, port_number)),
            );
        }
    }
    for slice in slices {
        let ports: Vec<u16> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.port.and_then(|p| u16::try_from(p).ok()))
            .collect();
        for endpoint in &slice.endpoints {
            // An endpoint that is explicitly not ready still accepts connections a pod may
            // try; catching it too costs nothing.
            for addr in &endpoint.addresses {
                if let Ok(ip) = addr.parse() {
                    targets.extend(ports.iter().map(|p| SocketAddr::new(ip, *p)));
                }
            }
        }
    }
    targets
}

/// Resolves `host:port` names (external API server names) to addresses. A name that does
/// not resolve this time keeps the addresses it had (`last`): a DNS hiccup must not take
/// the API server out of the kernel's targets, which would let pods reach it directly.
/// Returns how many names failed.
pub async fn resolve_hosts(
    hosts: &[String],
    last: &mut BTreeMap<String, BTreeSet<SocketAddr>>,
) -> usize {
    let mut failed = 0;
    for host in hosts {
        match tokio::net::lookup_host(host.as_str()).await {
            Ok(addrs) => {
                last.insert(host.clone(), addrs.collect());
            }
            Err(e) => {
                failed += 1;
                let kept = last.get(host).map_or(0, BTreeSet::len);
                tracing::warn!(%host, error = %e, kept, "cannot resolve an API server name; its last addresses stay redirected");
            }
        }
    }
    failed
}

/// What the target loop combines.
#[derive(Clone)]
pub struct TargetSources {
    /// Literal addresses from the config.
    pub fixed: Vec<SocketAddr>,
    /// `host:port` names, re-resolved every `resolve_every`.
    pub hosts: Vec<String>,
    /// How often names are re-resolved.
    pub resolve_every: Duration,
    /// Watch `default/kubernetes` and its EndpointSlices (needs API access).
    pub client: Option<kube::Client>,
    /// Counts failures to learn or apply the addresses (`chaperone_redirect_target_errors`).
    pub errors: prometheus_client::metrics::counter::Counter,
}

/// The EndpointSlices of the `kubernetes` Service as a watch reports them. A relist is
/// taken whole when it is complete: clearing the set at its start would drop every
/// endpoint address from the kernel's targets until the list arrived.
#[derive(Default)]
struct Slices {
    current: Vec<EndpointSlice>,
    relist: Option<Vec<EndpointSlice>>,
}

impl Slices {
    fn handle(&mut self, event: watcher::Event<EndpointSlice>) {
        let put = |slices: &mut Vec<EndpointSlice>, s: EndpointSlice| {
            slices.retain(|old| old.metadata.name != s.metadata.name);
            slices.push(s);
        };
        match event {
            watcher::Event::Init => self.relist = Some(Vec::new()),
            watcher::Event::InitApply(s) => match self.relist.as_mut() {
                Some(relist) => put(relist, s),
                None => put(&mut self.current, s),
            },
            watcher::Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.current = relist;
                }
            }
            watcher::Event::Apply(s) => put(&mut self.current, s),
            watcher::Event::Delete(s) => self
                .current
                .retain(|old| old.metadata.name != s.metadata.name),
        }
    }
}

/// Keeps the kernel's target maps equal to the union of all sources until the drain.
/// Errors never remove a target: what was learnt last stays until a source says otherwise.
pub async fn target_loop(
    sources: TargetSources,
    interceptor: Arc<Interceptor>,
    drain: DrainWatcher,
) {
    // The Service is kept when it is deleted: the API server recreates it, and until then
    // its address is still the one pods use.
    let mut service: Option<Service> = None;
    let mut slices = Slices::default();
    let mut resolved = BTreeMap::new();
    let failed = resolve_hosts(&sources.hosts, &mut resolved).await;
    sources.errors.inc_by(failed as u64);
    let mut applied: BTreeSet<SocketAddr> = BTreeSet::new();

    let mut services = sources.client.clone().map(|c| {
        let api: kube::Api<Service> = kube::Api::namespaced(c, "default");
        watcher(
            api,
            watcher::Config::default().fields("metadata.name=kubernetes"),
        )
        // A refused or failing watch retries with backoff, not in a loop of LIST calls.
        .default_backoff()
        .boxed()
    });
    let mut endpoint_slices = sources.client.clone().map(|c| {
        let api: kube::Api<EndpointSlice> = kube::Api::namespaced(c, "default");
        watcher(
            api,
            watcher::Config::default().labels("kubernetes.io/service-name=kubernetes"),
        )
        .default_backoff()
        .boxed()
    });
    let mut tick = tokio::time::interval(sources.resolve_every);
    loop {
        let want: BTreeSet<SocketAddr> = sources
            .fixed
            .iter()
            .copied()
            .chain(resolved.values().flatten().copied())
            .chain(targets_from(service.as_ref(), &slices.current))
            .collect();
        if want != applied {
            let list: Vec<SocketAddr> = want.iter().copied().collect();
            match interceptor.set_targets(&list) {
                Ok(()) => {
                    tracing::info!(targets = ?list, "API server targets updated");
                    applied = want;
                }
                Err(e) => {
                    sources.errors.inc();
                    tracing::error!(error = %e, "updating redirect targets failed");
                }
            }
        }
        tokio::select! {
            _ = drain.signaled() => return,
            _ = tick.tick() => {
                let failed = resolve_hosts(&sources.hosts, &mut resolved).await;
                sources.errors.inc_by(failed as u64);
            }
            Some(event) = next(&mut services) => match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => service = Some(s),
                Ok(_) => {}
                Err(e) => {
                    sources.errors.inc();
                    tracing::warn!(error = %e, "watching the kubernetes Service");
                }
            },
            Some(event) = next(&mut endpoint_slices) => match event {
                Ok(event) => slices.handle(event),
                Err(e) => {
                    sources.errors.inc();
                    tracing::warn!(error = %e, "watching the kubernetes EndpointSlices");
                }
            },
        }
    }
}

async fn next<S: futures_util::Stream + Unpin>(stream: &mut Option<S>) -> Option<S::Item> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_endpoint_slices_become_targets() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "198.51.100.1", "clusterIPs": ["198.51.100.1", "fd00:10:96::1"],
                     "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.0.2.10"]}, {"addresses": ["192.0.2.11"], "conditions": {"ready": false}}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]
        }))
        .unwrap();
        let targets: Vec<String> = targets_from(Some(&service), &[slice])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            targets,
            [
                "192.0.2.10:6443",
                "192.0.2.11:6443",
                "198.51.100.1:443",
                "[fd00:10:96::1]:443"
            ],
        );
        assert!(targets_from(None, &[]).is_empty());
    }

    #[tokio::test]
    async fn host_names_resolve_and_bad_names_keep_their_last_addresses() {
        // Fails without asking a DNS server (tests send nothing off the machine).
        let bad = "localhost:no-port".to_owned();
        let hosts = ["localhost:6443".to_owned(), bad.clone()];
        let mut resolved = BTreeMap::new();
        assert_eq!(resolve_hosts(&hosts, &mut resolved).await, 1);
        let all: Vec<SocketAddr> = resolved.values().flatten().copied().collect();
        assert!(
            all.iter().any(|a| a.ip().is_loopback() && a.port() == 6443),
            "{all:?}"
        );
        assert!(all.iter().all(|a| a.port() == 6443), "{all:?}");
        // A name that resolved before and fails now keeps what it had.
        let before: SocketAddr = "192.0.2.7:443".parse().unwrap();
        resolved.insert(bad.clone(), BTreeSet::from([before]));
        assert_eq!(resolve_hosts(&hosts, &mut resolved).await, 1);
        assert_eq!(resolved[&bad], BTreeSet::from([before]));
    }

    fn slice(name: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]
        }))
        .unwrap()
    }

    #[test]
    fn a_relist_replaces_the_slices_only_once_complete() {
        let targets = |s: &Slices| -> Vec<String> {
            targets_from(None, &s.current)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let mut slices = Slices::default();
        slices.handle(watcher::Event::Apply(slice("kubernetes", "192.0.2.10")));
        assert_eq!(targets(&slices), ["192.0.2.10:6443"]);
        // A relist (after a watch error, say): until it is done, the old addresses stay.
        slices.handle(watcher::Event::Init);
        assert_eq!(targets(&slices), ["192.0.2.10:6443"]);
        slices.handle(watcher::Event::InitApply(slice("kubernetes", "192.0.2.11")));
        assert_eq!(targets(&slices), ["192.0.2.10:6443"]);
        slices.handle(watcher::Event::InitDone);
        assert_eq!(targets(&slices), ["192.0.2.11:6443"]);
        // An explicit delete does remove.
        slices.handle(watcher::Event::Delete(slice("kubernetes", "192.0.2.11")));
        assert!(targets(&slices).is_empty());
    }
}
