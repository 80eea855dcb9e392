//! The gateway's container is not privileged: deploy/daemonset.yaml grants it a short list
//! of capabilities. This test loads, attaches and pins the eBPF programs from a thread that
//! has exactly that list, and proves a pod's connection is still redirected and attributed.
//!
//! It is a test binary of its own: aya probes the kernel's features once per process, on
//! the first load, and caches what it found. Here that first load runs with the DaemonSet's
//! capabilities, as in the container (in a shared binary another test's load, with every
//! capability, could have probed first and hidden a probe that fails without them).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use caps::{CapSet, Capability, CapsHashSet};
use chaperone_e2e::privileged;
use chaperone_testkit::sandbox::{SandboxPod, TEST_PIN_PREFIX, cleanup_stale};
use gateway_userspace::ebpf::{EbpfError, Interceptor, InterceptorSettings, PinGuard};
use tokio::{io::AsyncReadExt as _, net::TcpListener, time::timeout};

/// What deploy/daemonset.yaml adds (after dropping ALL), in its order.
const DAEMONSET_CAPABILITIES: &[Capability] = &[
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_PERFMON,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Runs `attach` on a new thread whose effective and permitted capabilities are `keep`
/// (capabilities belong to a thread; the rest of the test process keeps its own). The
/// outer error is the set-up's, the inner one the attach's.
fn attach_with_only(
    keep: &[Capability],
    settings: InterceptorSettings,
) -> Result<Result<Interceptor, EbpfError>, String> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    std::thread::spawn(move || {
        caps::set(None, CapSet::Effective, &keep)
            .map_err(|e| format!("lower effective capabilities: {e}"))?;
        caps::set(None, CapSet::Permitted, &keep)
            .map_err(|e| format!("lower permitted capabilities: {e}"))?;
        let now =
            caps::read(None, CapSet::Effective).map_err(|e| format!("read capabilities: {e}"))?;
        if now != keep {
            return Err(format!("the thread has {now:?}, not {keep:?}"));
        }
        Ok(Interceptor::attach(&settings))
    })
    .join()
    .map_err(|_| "the attaching thread panicked".to_owned())?
}

fn pin_path(what: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/{TEST_PIN_PREFIX}{}-{what}",
        std::process::id()
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_attaches_with_only_the_capabilities_the_daemonset_grants() {
    let test = "capabilities";
    if !privileged(test) {
        return;
    }
    cleanup_stale();
    let listed: Vec<String> = DAEMONSET_CAPABILITIES
        .iter()
        .map(|c| c.to_string().trim_start_matches("CAP_").to_owned())
        .collect();
    let shipped = include_str!("../../deploy/daemonset.yaml");
    assert!(
        shipped.contains(&format!("add: [{}]", listed.join(", "))),
        "deploy/daemonset.yaml must add exactly [{}] (the list this test proves)",
        listed.join(", ")
    );

    let pod = SandboxPod::create().expect("create sandbox pod");
    let listener = TcpListener::bind((pod.host_ip(), 0))
        .await
        .expect("bind proxy");
    let proxy = listener.local_addr().expect("addr");
    let target = SocketAddr::from(pod.virtual_api_server());
    let settings = |pin_path: PathBuf| InterceptorSettings {
        targets: vec![target],
        proxy,
        pin_path,
        fail_open_after: Duration::from_millis(500),
        connections_max: 4096,
    };

    let pins = pin_path(test);
    let _guard = PinGuard::new(pins.clone());
    let interceptor = attach_with_only(DAEMONSET_CAPABILITIES, settings(pins.clone()))
        .expect("a thread with the DaemonSet's capabilities")
        .unwrap_or_else(|e| panic!("attach with the DaemonSet's capabilities: {e}"));
    let code = format!(
        "import socket\ns = socket.create_connection(('{}', {}), timeout=5)\ns.sendall(b'hello')\ns.close()",
        target.ip(),
        target.port()
    );
    let mut python = tokio::process::Command::from(pod.command("python3"));
    python.arg("-c").arg(code).kill_on_drop(true);
    let (out, accepted) = tokio::join!(
        timeout(Duration::from_secs(30), python.output()),
        timeout(Duration::from_secs(10), listener.accept()),
    );
    let out = out
        .expect("python in the pod took over 30 s")
        .expect("run python3");
    assert!(
        out.status.success(),
        "python in the pod failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut sock, peer) = accepted
        .expect("the pod's connection was not redirected to the proxy")
        .expect("accept");
    let origin = interceptor
        .origin(peer, sock.local_addr().expect("local"))
        .expect("the kernel recorded no origin");
    assert_eq!(origin.original_dst, target);
    assert_eq!(origin.cgroup_id, pod.cgroup_id().expect("cgroup id"));
    let mut text = String::new();
    sock.read_to_string(&mut text).await.expect("read");
    assert_eq!(text, "hello");
    interceptor.uninstall().expect("uninstall");
    assert!(!pins.exists());

    // The control: one capability fewer and the kernel refuses, so the thread above really
    // had only the list.
    let without_bpf: Vec<Capability> = DAEMONSET_CAPABILITIES
        .iter()
        .copied()
        .filter(|c| *c != Capability::CAP_BPF)
        .collect();
    let denied_pins = pin_path("capabilities-denied");
    let _denied_guard = PinGuard::new(denied_pins.clone());
    let denied = attach_with_only(&without_bpf, settings(denied_pins))
        .expect("a thread with the DaemonSet's capabilities but CAP_BPF");
    assert!(
        denied.is_err(),
        "attached without CAP_BPF: the thread's capabilities were not lowered"
    );
}
