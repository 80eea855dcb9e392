//! The eBPF interception boundary on the real kernel. Each test builds its own sandbox
//! pods (own cgroup, network namespace and veth) and pins its programs under its own bpffs
//! directory, so tests run in parallel and leave nothing behind. Test names say which
//! property they prove.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Output,
    time::Duration,
};

use chaperone_e2e::privileged;
use chaperone_testkit::sandbox::{SandboxPod, TEST_PIN_PREFIX, cleanup_stale};
use gateway_userspace::ebpf::{Interceptor, InterceptorSettings, PinGuard};
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
    time::timeout,
};

/// A pin directory no other test uses; `cleanup_stale` recognises it by the pid.
fn pin_path(test: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/{TEST_PIN_PREFIX}{}-{test}",
        uuid_suffix()
    ))
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:x}", std::process::id())
}

/// Attaches the programs; the returned guard removes them even if the test fails.
fn attach(
    test: &str,
    targets: Vec<SocketAddr>,
    proxy: SocketAddr,
) -> (Interceptor, PathBuf, PinGuard) {
    let pin_path = pin_path(test);
    let guard = PinGuard::new(pin_path.clone());
    let interceptor = Interceptor::attach(&InterceptorSettings {
        targets,
        proxy,
        pin_path: pin_path.clone(),
        fail_open_after: Duration::from_millis(500),
        connections_max: 4096,
    })
    .unwrap_or_else(|e| panic!("{test}: attach eBPF: {e}"));
    (interceptor, pin_path, guard)
}

/// Runs a Python snippet inside the pod. `CONNECT(host, port)` in the snippet connects a
/// socket of the right family (`::ffff:` and IPv6 hosts use AF_INET6).
async fn pod_python(pod: &SandboxPod, code: &str) -> Output {
    let prelude = "import socket, sys, errno\n\
        def CONNECT(host, port, bind_port=0):\n\
        \x20   fam = socket.AF_INET6 if ':' in host else socket.AF_INET\n\
        \x20   s = socket.socket(fam, socket.SOCK_STREAM)\n\
        \x20   s.settimeout(5)\n\
        \x20   if bind_port:\n\
        \x20       s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        \x20       s.bind(('', bind_port))\n\
        \x20   s.connect((host, port))\n\
        \x20   return s\n";
    let mut cmd = tokio::process::Command::from(pod.command("python3"));
    cmd.arg("-c")
        .arg(format!("{prelude}{code}"))
        .kill_on_drop(true);
    timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("python in the pod took over 30 s")
        .expect("run python3 in the pod")
}

fn stdout(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "python in the pod failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("no connection reached the listener within 10 s")
        .expect("accept")
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_first_connect_from_a_brand_new_cgroup_is_attributed_and_host_namespace_is_not_redirected()
 {
    let test = "first_connect";
    if !privileged(test) {
        return;
    }
    cleanup_stale();
    let setup = SandboxPod::create().expect("create sandbox pod");
    let listener = TcpListener::bind((setup.host_ip(), 0))
        .await
        .expect("bind proxy");
    let proxy = listener.local_addr().expect("addr");
    let target = setup.virtual_api_server();
    let (interceptor, pins, _guard) = attach(test, vec![target.into()], proxy);

    // A pod whose cgroup did not exist when the programs were attached: intercepted by
    // default, no classification needed.
    let pod = SandboxPod::create().expect("create a second sandbox pod");
    pod.route_to(proxy.ip().to_string().parse().expect("ipv4"))
        .expect("route to the proxy");
    let target = SocketAddr::from(pod.virtual_api_server());
    interceptor.set_targets(&[target]).expect("set targets");
    let code = format!(
        "s = CONNECT('{}', {})\ns.sendall(b'hello-from-pod')\ns.close()",
        target.ip(),
        target.port()
    );
    let (out, (mut sock, peer)) = tokio::join!(pod_python(&pod, &code), accept(&listener));
    stdout(&out);
    let local = sock.local_addr().expect("local");
    let origin = interceptor
        .origin(peer, local)
        .expect("the kernel recorded no origin");
    assert_eq!(origin.original_dst, target);
    assert_eq!(origin.cgroup_id, pod.cgroup_id().expect("cgroup id"));
    assert!(
        origin.command.starts_with("python3"),
        "command {:?}",
        origin.command
    );
    let mut text = String::new();
    sock.read_to_string(&mut text).await.expect("read");
    assert_eq!(text, "hello-from-pod");

    let before = interceptor.counters();
    let direct = timeout(Duration::from_secs(2), TcpStream::connect(target)).await;
    assert!(
        !matches!(direct, Ok(Ok(_))),
        "a host-namespace connect to {target} succeeded"
    );
    assert!(
        timeout(Duration::from_millis(300), listener.accept())
            .await
            .is_err(),
        "a host connect was redirected"
    );
    let after = interceptor.counters();
    assert_eq!(after.redirected, before.redirected);
    assert!(after.host_namespace > before.host_namespace, "{after:?}");
    interceptor.uninstall().expect("uninstall");
    assert!(!pins.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_ipv6_v4_mapped_and_endpoint_targets_are_caught_and_getpeername_shows_the_dialled_address()
 {
    let test = "ipv6_endpoint";
    if !privileged(test) {
        return;
    }
    cleanup_stale();
    let pod = SandboxPod::create().expect("create sandbox pod");
    pod.enable_ipv6().expect("enable IPv6 in the pod");
    let listener = TcpListener::bind((pod.host_ip(), 0))
        .await
        .expect("bind proxy");
    let proxy = listener.local_addr().expect("addr");
    let v4 = SocketAddr::from(pod.virtual_api_server());
    let v6 = SocketAddr::from(pod.virtual_api_server6());
    // A ClusterIP-style target (:443) and an endpoint-style one (another address, :6443).
    let endpoint = SocketAddr::new(
        IpAddr::V4(std::net::Ipv4Addr::from(u32::from(pod.pod_ip()) + 99)),
        6443,
    );
    let (interceptor, _pins, _guard) = attach(test, vec![v4, v6, endpoint], proxy);
    let mapped: SocketAddr = format!("[::ffff:{}]:{}", v4.ip(), v4.port())
        .parse()
        .expect("mapped");

    for (dial, expect_dst) in [(v6, v6), (mapped, mapped), (v4, v4), (endpoint, endpoint)] {
        let code = format!(
            "s = CONNECT('{}', {})\nprint(s.getpeername()[0], s.getpeername()[1])",
            dial.ip(),
            dial.port()
        );
        let (out, (sock, peer)) = tokio::join!(pod_python(&pod, &code), accept(&listener));
        let seen = stdout(&out);
        let origin = interceptor
            .origin(peer, sock.local_addr().expect("local"))
            .unwrap_or_else(|| {
                panic!(
                    "no origin recorded for {dial} ({peer}): {:?}",
                    interceptor.status()
                )
            });
        assert_eq!(origin.original_dst, expect_dst, "dialled {dial}");
        assert_eq!(origin.cgroup_id, pod.cgroup_id().expect("cgroup id"));
        // getpeername: the client sees what it dialled, never the proxy.
        let (ip, port) = seen.split_once(' ').expect("ip port");
        assert_eq!(
            ip.parse::<IpAddr>().expect("ip"),
            dial.ip(),
            "getpeername for {dial}"
        );
        assert_eq!(port.parse::<u16>().expect("port"), dial.port());
    }
    interceptor.uninstall().expect("uninstall");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_same_port_in_two_pods_and_many_connections_are_each_attributed_to_their_own_cgroup()
 {
    let test = "same_port";
    if !privileged(test) {
        return;
    }
    cleanup_stale();
    let a = SandboxPod::create().expect("pod a");
    let b = SandboxPod::create().expect("pod b");
    let listener = TcpListener::bind((a.host_ip(), 0))
        .await
        .expect("bind proxy");
    let proxy = listener.local_addr().expect("addr");
    b.route_to(a.host_ip())
        .expect("route pod b to the proxy address");
    let (ta, tb) = (
        SocketAddr::from(a.virtual_api_server()),
        SocketAddr::from(b.virtual_api_server()),
    );
    let (interceptor, _pins, _guard) = attach(test, vec![ta, tb], proxy);

    const PER_POD: usize = 20;
    let script = |t: SocketAddr| {
        format!(
            "socks = [CONNECT('{ip}', {port}, 40123)]\n\
             socks += [CONNECT('{ip}', {port}) for _ in range({n})]\n\
             print(' '.join(str(s.getsockname()[1]) for s in socks))\n\
             sys.stdin.read()",
            ip = t.ip(),
            port = t.port(),
            n = PER_POD - 1
        )
    };
    let spawn = |pod: &SandboxPod, t: SocketAddr| {
        let mut cmd = tokio::process::Command::from(pod.command("python3"));
        let prelude = "import socket, sys\ndef CONNECT(h, p, bp=0):\n s = socket.socket()\n s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n s.bind(('', bp))\n s.connect((h, p))\n return s\n";
        cmd.arg("-c")
            .arg(format!("{prelude}{}", script(t)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().expect("spawn python in pod")
    };
    let mut children = [spawn(&a, ta), spawn(&b, tb)];
    let mut accepted = Vec::new();
    for _ in 0..2 * PER_POD {
        let (sock, peer) = accept(&listener).await;
        let origin = interceptor
            .origin(peer, sock.local_addr().expect("local"))
            .expect("no origin recorded");
        accepted.push((peer, origin, sock));
    }
    let (ida, idb) = (a.cgroup_id().expect("a"), b.cgroup_id().expect("b"));
    let mut same_port = 0;
    for (peer, origin, _) in &accepted {
        let (want_cgroup, want_dst) = if peer.ip() == IpAddr::V4(a.pod_ip()) {
            (ida, ta)
        } else {
            (idb, tb)
        };
        assert_eq!(
            origin.cgroup_id, want_cgroup,
            "connection from {peer} attributed to the wrong cgroup"
        );
        assert_eq!(origin.original_dst, want_dst);
        same_port += usize::from(peer.port() == 40123);
    }
    assert_eq!(
        same_port, 2,
        "both pods' port-40123 connections must be seen"
    );
    for child in &mut children {
        drop(child.stdin.take());
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_string(&mut out).await.expect("read child");
        }
        assert!(
            child.wait().await.expect("wait").success(),
            "python in a pod failed: {out}"
        );
    }
    interceptor.uninstall().expect("uninstall");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_bypass_map_lets_an_out_of_scope_pod_connect_directly() {
    let test = "bypass";
    if !privileged(test) {
        return;
    }
    cleanup_stale();
    let pod = SandboxPod::create().expect("create sandbox pod");
    pod.claim_virtual_api_server()
        .expect("claim the virtual address");
    let target = SocketAddr::from(pod.virtual_api_server());
    let direct = TcpListener::bind(target)
        .await
        .expect("bind the 'real API server'");
    let proxy_listener = TcpListener::bind((pod.host_ip(), 0))
        .await
        .expect("bind proxy");
    let (interceptor, _pins, _guard) = attach(
        test,
        vec![target],
        proxy_listener.local_addr().expect("addr"),
    );
    let code = format!("CONNECT('{}', {}).close()", target.ip(), target.port());
    let cgroup = pod.cgroup_id().expect("cgroup id");

    interceptor.set_bypass(cgroup, true).expect("bypass");
    let (out, _) = tokio::join!(pod_python(&pod, &code), accept(&direct));
    stdout(&out);
    assert!(interceptor.counters().bypassed >= 1);

    interceptor
        .set_bypass(cgroup, false)
        .expect("back in scope");
    let (out, _) = tokio::join!(pod_python(&pod, &code), accept(&proxy_listener));
    stdout(&out);
    assert!(
        timeout(Duration::from_millis(300), direct.accept())
            .await
            .is_err(),
        "in-scope pod reached the target directly"
    );
    interceptor.uninstall().expect("uninstall");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_restart_fails_closed_then_adopts_pinned_state_and_uninstall_leaves_nothing() {
    let test = "restart";
    if !privileged(test) {
        return;
    }
    cleanup_stale();
    let pod = SandboxPod::create().expect("create sandbox pod");
    pod.claim_virtual_api_server()
        .expect("claim the virtual address");
    let target = SocketAddr::from(pod.virtual_api_server());
    let direct = TcpListener::bind(target)
        .await
        .expect("bind the 'real API server'");
    let proxy_addr = SocketAddr::from((pod.host_ip(), 15443));
    let listener = TcpListener::bind(proxy_addr).await.expect("bind proxy");
    let (interceptor, pins, _guard) = attach(test, vec![target], proxy_addr);
    let code = format!(
        "try:\n    CONNECT('{}', {}).close(); print('connected')\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno, e))",
        target.ip(),
        target.port()
    );

    // The daemon stops: pinned links stay, so the pod is still sent to the (now closed)
    // proxy port and refused, never to the API server directly.
    drop(interceptor);
    drop(listener);
    assert_eq!(
        stdout(&pod_python(&pod, &code).await),
        "ECONNREFUSED",
        "a pod got through while the daemon was down"
    );
    assert!(
        timeout(Duration::from_millis(300), direct.accept())
            .await
            .is_err(),
        "a pod reached the API server directly"
    );

    // The daemon comes back: it adopts the pinned programs and maps.
    let listener = TcpListener::bind(proxy_addr).await.expect("rebind proxy");
    let interceptor = Interceptor::attach(&InterceptorSettings {
        targets: vec![target],
        proxy: proxy_addr,
        pin_path: pins.clone(),
        fail_open_after: Duration::from_millis(500),
        connections_max: 4096,
    })
    .expect("re-attach");
    assert_eq!(
        interceptor.status().programs.len(),
        7,
        "{:?}",
        interceptor.status()
    );
    let (out, (sock, peer)) = tokio::join!(pod_python(&pod, &code), accept(&listener));
    assert_eq!(stdout(&out), "connected");
    let origin = interceptor
        .origin(peer, sock.local_addr().expect("local"))
        .unwrap_or_else(|| {
            panic!(
                "adopted maps attribute nothing for {peer}: {:?}",
                interceptor.status()
            )
        });
    assert_eq!(origin.cgroup_id, pod.cgroup_id().expect("cgroup"));

    // Opt-in fail-open: with the daemon silent, a fail-open pod connects directly.
    interceptor
        .set_fail_open(pod.cgroup_id().expect("cgroup"), true)
        .expect("fail-open");
    drop(interceptor);
    drop(listener);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (out, _) = tokio::join!(pod_python(&pod, &code), accept(&direct));
    assert_eq!(stdout(&out), "connected");

    // Uninstall removes every pin and the redirect with it.
    gateway_userspace::ebpf::uninstall(&pins).expect("uninstall");
    assert!(!pins.exists(), "{} left behind", pins.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_raw_socket_packets_to_the_api_server_are_dropped() {
    let test = "raw_socket";
    if !privileged(test) {
        return;
    }
    cleanup_stale();
    let pod = SandboxPod::create().expect("create sandbox pod");
    let listener = TcpListener::bind((pod.host_ip(), 0))
        .await
        .expect("bind proxy");
    let target = SocketAddr::from(pod.virtual_api_server());
    let (interceptor, _pins, _guard) =
        attach(test, vec![target], listener.local_addr().expect("addr"));
    // A hand-made SYN to the API server address, and the same to a neighbour address.
    let code = format!(
        "import struct\n\
         syn = struct.pack('!HHIIBBHHH', 40000, {port}, 1, 0, 5 << 4, 2, 65535, 0, 0)\n\
         r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)\n\
         res = []\n\
         for dst in ['{ip}', '{other}']:\n\
         \x20   try:\n\
         \x20       r.sendto(syn, (dst, 0)); res.append('sent')\n\
         \x20   except OSError as e:\n\
         \x20       res.append(errno.errorcode.get(e.errno, str(e)))\n\
         print(' '.join(res))",
        port = target.port(),
        ip = target.ip(),
        other = pod.host_ip()
    );
    let before = interceptor.counters().guard_drops;
    assert_eq!(
        stdout(&pod_python(&pod, &code).await),
        "EPERM sent",
        "raw SYN to the API server was not dropped"
    );
    assert!(interceptor.counters().guard_drops > before);
    interceptor.uninstall().expect("uninstall");
}
