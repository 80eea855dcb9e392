//! Measures what the eBPF redirect adds to connect(): a sandbox pod connects many times to
//! a listener on the node, without the programs, with them attached but not matching, and
//! through the redirect. Run as root by `cargo xtask bench`; prints a table and writes
//! `target/bench/connect.json`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use chaperone_testkit::sandbox::{SandboxPod, TEST_PIN_PREFIX, cleanup_stale};
use gateway_userspace::ebpf::{Interceptor, InterceptorSettings};
use tokio::net::TcpListener;

/// connect() calls per scenario and pass.
const ROUNDS: usize = 3000;
/// Alternating passes over the scenarios.
const PASSES: usize = 5;

/// The pass whose median is the median of all passes.
fn middle(mut passes: Vec<Figures>) -> Figures {
    passes.sort_by(|a, b| a.median_us.total_cmp(&b.median_us));
    passes.swap_remove(passes.len() / 2)
}

#[derive(serde::Serialize)]
struct Figures {
    median_us: f64,
    p99_us: f64,
}

/// Runs `ROUNDS` timed connects from inside the pod and returns per-connect microseconds.
/// Each socket is closed with a reset (SO_LINGER 0): a normal close would leave it in
/// TIME_WAIT, and tens of thousands of those crowd the ephemeral port range until connect()
/// spends milliseconds searching for a free port, which is not what this measures.
async fn measure(pod: &SandboxPod, to: SocketAddr) -> anyhow::Result<Figures> {
    let code = format!(
        "import socket, struct, time\n\
         xs = []\n\
         for _ in range({ROUNDS}):\n\
         \x20   s = socket.socket()\n\
         \x20   t = time.perf_counter_ns(); s.connect(('{ip}', {port})); xs.append(time.perf_counter_ns() - t)\n\
         \x20   s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n\
         \x20   s.close()\n\
         xs.sort()\n\
         print(xs[len(xs) // 2] / 1000, xs[len(xs) * 99 // 100] / 1000)",
        ip = to.ip(),
        port = to.port()
    );
    let out = tokio::process::Command::from(pod.command("python3"))
        .arg("-c")
        .arg(code)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace().map(str::parse::<f64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(median_us)), Some(Ok(p99_us))) => Ok(Figures { median_us, p99_us }),
        _ => anyhow::bail!("unexpected output {text:?}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cleanup_stale();
    let pod = SandboxPod::create()?;
    let listener = TcpListener::bind((pod.host_ip(), 0)).await?;
    let proxy = listener.local_addr()?;
    // Accept and drop everything so the backlog never fills.
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            drop(sock);
        }
    });
    let target = SocketAddr::from(pod.virtual_api_server());

    // Scenarios alternate over several passes and each reports the median of its passes'
    // medians, so drift on a shared machine does not land on one scenario.
    let pin_path = PathBuf::from(format!(
        "/sys/fs/bpf/{TEST_PIN_PREFIX}{}-bench",
        std::process::id()
    ));
    let _guard = gateway_userspace::ebpf::PinGuard::new(pin_path.clone());
    let settings = InterceptorSettings {
        targets: vec![target],
        proxy,
        pin_path,
        fail_open_after: Duration::from_secs(5),
        connections_max: 65_536,
    };
    let (mut baseline, mut attached, mut redirected) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..PASSES {
        baseline.push(measure(&pod, proxy).await?);
        let interceptor = Interceptor::attach(&settings)?;
        attached.push(measure(&pod, proxy).await?);
        redirected.push(measure(&pod, target).await?);
        interceptor.uninstall()?;
    }
    let (baseline, attached, redirected) = (middle(baseline), middle(attached), middle(redirected));

    println!(
        "connect() from a sandbox pod, {PASSES} passes x {ROUNDS} rounds (median / p99, microseconds)"
    );
    println!(
        "  no eBPF programs                 {:>7.1} / {:>7.1}",
        baseline.median_us, baseline.p99_us
    );
    println!(
        "  programs attached, no match      {:>7.1} / {:>7.1}",
        attached.median_us, attached.p99_us
    );
    println!(
        "  redirected (target -> proxy)     {:>7.1} / {:>7.1}",
        redirected.median_us, redirected.p99_us
    );
    println!(
        "  added by the redirect (median)   {:>7.1}",
        redirected.median_us - baseline.median_us
    );
    let summary = serde_json::json!({
        "rounds": ROUNDS,
        "baseline": baseline,
        "attached_no_match": attached,
        "redirected": redirected,
        "added_median_us": redirected.median_us - baseline.median_us,
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("connect.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(())
}
