//! Where the API server is: the addresses the kernel redirect must catch.
//!
//! A pod can reach the API server through the `default/kubernetes` Service (ClusterIP and
//! port), directly through its endpoint addresses (EndpointSlices labelled
//! `kubernetes.io/service-name=kubernetes`), or through an external name (a load
//! balancer). All of them become redirect targets, kept current as they change.

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

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

/// Resolves `host:port` names (external API server names) to addresses.
pub async fn resolve_hosts(hosts: &[String]) -> BTreeSet<SocketAddr> {
    let mut out = BTreeSet::new();
    for host in hosts {
        match tokio::net::lookup_host(host.as_str()).await {
            Ok(addrs) => out.extend(addrs),
            Err(e) => {
                tracing::warn!(%host, error = %e, "cannot resolve an API server name; keeping the other targets")
            }
        }
    }
    out
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
}

/// Keeps the kernel's target maps equal to the union of all sources until the drain.
pub async fn target_loop(
    sources: TargetSources,
    interceptor: Arc<Interceptor>,
    drain: DrainWatcher,
) {
    let mut service: Option<Service> = None;
    let mut slices: Vec<EndpointSlice> = Vec::new();
    let mut resolved = resolve_hosts(&sources.hosts).await;
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
            .chain(resolved.iter().copied())
            .chain(targets_from(service.as_ref(), &slices))
            .collect();
        if want != applied {
            let list: Vec<SocketAddr> = want.iter().copied().collect();
            match interceptor.set_targets(&list) {
                Ok(()) => {
                    tracing::info!(targets = ?list, "API server targets updated");
                    applied = want;
                }
                Err(e) => tracing::error!(error = %e, "updating redirect targets failed"),
            }
        }
        tokio::select! {
            _ = drain.signaled() => return,
            _ = tick.tick() => resolved = resolve_hosts(&sources.hosts).await,
            Some(event) = next(&mut services) => match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => service = Some(s),
                Ok(watcher::Event::Delete(_)) => service = None,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "watching the kubernetes Service"),
            },
            Some(event) = next(&mut endpoint_slices) => match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                    let name = s.metadata.name.clone();
                    slices.retain(|old| old.metadata.name != name);
                    slices.push(s);
                }
                Ok(watcher::Event::Delete(s)) => slices.retain(|old| old.metadata.name != s.metadata.name),
                Ok(watcher::Event::Init) => slices.clear(),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "watching the kubernetes EndpointSlices"),
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
    async fn host_names_resolve_and_bad_names_are_skipped() {
        let resolved = resolve_hosts(&[
            "localhost:6443".to_owned(),
            "no-such-host.invalid:443".to_owned(),
        ])
        .await;
        assert!(
            resolved
                .iter()
                .any(|a| a.ip().is_loopback() && a.port() == 6443),
            "{resolved:?}"
        );
        assert!(resolved.iter().all(|a| a.port() == 6443), "{resolved:?}");
    }
}
