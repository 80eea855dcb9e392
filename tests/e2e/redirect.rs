//! The kernel redirect on the real kernel: a sandbox pod's connect() to a virtual API server
//! address lands on the proxy listener, attributed to the pod's cgroup; the node's own
//! connections to the same address are left alone.

use std::time::Duration;

use chaperone_e2e::privileged;
use gateway_userspace::{
    ebpf::Interceptor,
    test_helpers::sandbox::{SandboxPod, cleanup_stale},
};
use tokio::{io::AsyncReadExt as _, net::TcpListener, time::timeout};

#[tokio::test(flavor = "multi_thread")]
async fn redirect_attributes_pod_connect_to_its_cgroup_and_skips_host_namespace() {
    if !privileged("redirect_attributes_pod_connect_to_its_cgroup_and_skips_host_namespace") {
        return;
    }
    cleanup_stale();
    let pod = SandboxPod::create().expect("create sandbox pod");
    let listener = TcpListener::bind((pod.host_ip(), 0))
        .await
        .expect("bind proxy listener");
    let proxy_addr = listener.local_addr().expect("listener address");
    let target = pod.virtual_api_server();
    let interceptor = Interceptor::attach(&[target], proxy_addr).expect("attach eBPF redirect");

    let mut child = tokio::process::Command::from(pod.command("bash"))
        .arg("-c")
        .arg(format!(
            "echo hello-from-pod > /dev/tcp/{}/{}",
            target.ip(),
            target.port()
        ))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn bash in the sandbox pod");
    let (mut sock, peer) = timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the pod's connect was not redirected to the listener within 10 s")
        .expect("accept");
    let local = sock.local_addr().expect("local address");
    let origin = interceptor
        .origin(peer, local)
        .expect("the kernel recorded no origin for the connection");
    assert_eq!(origin.original_dst, target, "original destination");
    assert_eq!(
        origin.cgroup_id,
        pod.cgroup_id().expect("cgroup id"),
        "attributed cgroup"
    );
    assert_eq!(origin.command, "bash", "calling command");
    assert_eq!(
        peer.ip(),
        pod.pod_ip(),
        "the connection comes from the pod's address"
    );
    let mut text = String::new();
    sock.read_to_string(&mut text).await.expect("read from pod");
    assert_eq!(text, "hello-from-pod\n");
    let status = child.wait().await.expect("wait for bash");
    assert!(status.success(), "bash in the pod failed: {status}");
    assert!(
        interceptor.origin(peer, local).is_none(),
        "an origin is handed out once"
    );

    // The node's own namespace: the same destination must not be rewritten. Nothing answers
    // for the virtual address, so the connect must fail or time out, and never reach the
    // proxy listener.
    let before = interceptor.counters();
    let direct = timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(target),
    )
    .await;
    assert!(
        !matches!(direct, Ok(Ok(_))),
        "a host-namespace connect to {target} succeeded"
    );
    let stray = timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(
        stray.is_err(),
        "a host-namespace connection was redirected to the proxy"
    );
    let after = interceptor.counters();
    assert_eq!(
        after.redirected, before.redirected,
        "redirect counter moved for a host connect"
    );
    assert!(
        after.host_namespace > before.host_namespace,
        "host-namespace counter did not move: {after:?}"
    );
}
