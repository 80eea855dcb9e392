//! Measures what the gateway adds to an API request, side by side with nginx: the same small
//! GET over TLS and HTTP/2 (a) straight to the API test server, (b) through nginx as a
//! TLS-terminating HTTP/2 reverse proxy, and (c) through chaperone with a policy and
//! recording on (interception mode `none`). Run by `cargo xtask bench`; needs `nginx` and
//! `h2load` on the PATH. Prints a table and writes `target/bench/summary.json`.
//!
//! Three processes so the gateway's RSS is its own: this one (orchestrator, runs `h2load`
//! and `nginx` as children), `http_bench upstream <dir>` (the API test server, stops when
//! its stdin closes) and the gateway: the released `chaperone` binary itself
//! (`target/release/chaperone` beside this one, from a root `cargo build --release`, or
//! `$CHAPERONE_BIN`), run with a config written to the run's temporary directory and
//! stopped with SIGTERM. What is measured is what ships, built with the features a release
//! build enables, not the test kit's.
//!
//! A fourth figure is what masking adds: `GET` of two identical Secrets through the same
//! gateway, one under a `mask` rule (its data is masked on the way back) and one only
//! allowed, alternating over the passes (`http_bench masked` runs only this part).
//!
//! Latency comes from `h2load --log-file` (one row per request with its duration in
//! microseconds) at one connection and one stream; throughput is h2load's req/s over a
//! timed run with C connections of one stream each. CPU per request is the user + system
//! time (`/proc/<pid>/stat`) the target's own processes spend on a fixed number of
//! requests at 16 connections: the API test server's for `direct`, nginx's master and
//! workers', the gateway's. It does not depend on how busy the machine is, so it is the
//! figure to optimise; latency and throughput move with the neighbours.
//!
//! Every figure is printed as the median with its spread over the passes (min-max), and
//! `summary.json` keeps each pass's values under `passes`, so an unstable figure shows.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener as StdListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

/// The allocator the `chaperone` binary uses; the API test server has run on it in every
/// run since run F, so `direct`'s figures stay comparable.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context as _, bail, ensure};
use chaperone_testkit::apiserver::{ApiServerConfig, TestApiServer};
use gateway_userspace::tls::CertificateAuthority;

/// The token the API test server accepts; direct and nginx requests carry it, the gateway
/// injects it from its token file.
const TOKEN: &str = "bench-gateway-token";
/// What a pod would send to the gateway; the gateway strips it.
const POD_TOKEN: &str = "bench-pod-token";
const PATH: &str = "/api/v1/namespaces/default/pods/web-0";
/// Two Secrets with the same content: one masked by the policy, one only allowed.
const SECRET_PLAIN: &str = "/api/v1/namespaces/default/secrets/db-plain";
const SECRET_MASKED: &str = "/api/v1/namespaces/default/secrets/db-masked";
/// Requests per latency run (one connection, one stream).
const LATENCY_REQUESTS: usize = 3000;
/// Seconds of each throughput run, after one second of warm-up.
const THROUGHPUT_SECONDS: u32 = 5;
/// Alternating passes over the three targets; each figure is the median over passes.
const PASSES: usize = 3;
/// Requests of each CPU-time run (16 connections, one stream each).
const CPU_REQUESTS: usize = 20_000;
/// Back-to-back CPU-time runs of nginx then chaperone after the passes: each round's ratio
/// compares two runs seconds apart, so the machine's drift between passes cancels out.
const CPU_ROUNDS: usize = 7;
/// Back-to-back latency runs of the three targets after the passes, the order rotating
/// from round to round: each round's added latency subtracts a `direct` run made seconds
/// before or after, so neither the machine's drift between passes nor the order of the
/// targets moves it.
const LATENCY_ROUNDS: usize = 9;
/// Requests per target in each latency round (one connection, one stream).
const ROUND_REQUESTS: usize = 2000;
/// Pods each list scenario returns (~1 MiB of JSON).
const LIST_PODS: usize = 500;
const LIST_PATH: &str = "/api/v1/namespaces/bench/pods";
/// The same pods in a namespace whose reads the policy masks.
const LIST_MASKED_PATH: &str = "/api/v1/namespaces/bench-masked/pods";
const CREATE_PATH: &str = "/api/v1/namespaces/bench/configmaps";
/// Requests per list and create latency run (one connection, one stream).
const SCENARIO_REQUESTS: usize = 300;
/// Watches held open at once for the memory-per-watch figure.
const IDLE_WATCHES: usize = 1000;
/// Events in the watch scenario: pods seeded in `watch` (and `watch-masked`), sent as
/// ADDED events by a watch from resourceVersion 0.
const WATCH_EVENTS: usize = 1000;
/// Bytes an exec writes to stdout in the exec scenario (`head -c N /dev/zero`).
const EXEC_BYTES: usize = 256 * 1024 * 1024;
const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: Policy
default: allow
rules:
  - name: mask-bench-pods
    action: mask
    verbs: [get, list, watch]
    resources: [pods]
    namespaces: [bench-masked, watch-masked]
  - name: mask-bench-secret
    action: mask
    verbs: [get]
    resources: [secrets]
    resourceNames: [db-masked]
  - name: read-bench-secrets
    action: allow
    verbs: [get]
    resources: [secrets]
    resourceNames: [db-masked, db-plain]
  - name: no-secrets
    action: deny
    message: no secrets for agents
    verbs: ["*"]
    resources: [secrets]
  - name: exec-bench
    action: allow
    verbs: [create, get]
    resources: [pods/exec]
    resourceNames: [web-0]
  - name: exec-bench-masked
    action: mask
    verbs: [create, get]
    resources: [pods/exec]
    resourceNames: [web-1]
  - name: exec-bench-masked-allow
    action: allow
    verbs: [create, get]
    resources: [pods/exec]
    resourceNames: [web-1]
  - name: no-exec
    action: deny
    message: no interactive access
    verbs: ["*"]
    resources: [pods/exec, pods/attach, pods/portforward]
  - name: protect-namespaces
    action: deny
    verbs: [delete, deletecollection]
    resources: [namespaces]
  - name: protect-kube-system
    action: deny
    verbs: [create, update, patch, delete, deletecollection]
    resources: ["*"]
    namespaces: [kube-system]
  - name: read-pods
    action: allow
    verbs: [get, list, watch]
    resources: [pods, pods/log]
"#;

fn main() -> anyhow::Result<()> {
    // As the `chaperone` binary does (see the allocator above).
    gateway_userspace::alloc::tune();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [role, dir] if role == "upstream" => serve(upstream(Path::new(dir))),
        [] => orchestrate(),
        [mode] if mode == "hold" => hold(),
        [mode] if mode == "masked" => masked_only(),
        [mode] if mode == "train" => train(),
        _ => bail!("usage: http_bench [hold | masked | train | upstream <dir>]"),
    }
}

fn serve(fut: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(fut)
}

/// Blocks (off the runtime) until the orchestrator closes our stdin.
async fn stdin_closed() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
}

/// Writes `text` to `path` atomically, so a poller never reads half of it.
fn publish(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

async fn upstream(dir: &Path) -> anyhow::Result<()> {
    let ca = CertificateAuthority::from_files(&dir.join("ca.crt"), &dir.join("ca.key"))?;
    let server = TestApiServer::start(ApiServerConfig {
        ca: Some(Arc::new(ca)),
        tokens: vec![TOKEN.to_owned()],
        ..ApiServerConfig::default()
    })
    .await?;
    for name in ["web-0", "web-1"] {
        server.seed(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
            "status": {"phase": "Running"},
        }))?;
    }
    for namespace in ["bench", "bench-masked"] {
        for i in 0..LIST_PODS {
            server.seed(bench_pod(namespace, i))?;
        }
    }
    for namespace in ["watch", "watch-masked"] {
        for i in 0..WATCH_EVENTS {
            server.seed(bench_pod(namespace, i))?;
        }
    }
    // ~1.6 KB, the shape of the masking benchmark's Secret.
    for name in ["db-plain", "db-masked"] {
        server.seed(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "db", "tier": "backend"}},
            "type": "Opaque",
            "data": {"password": "aHVudGVyMmh1bnRlcjJodW50ZXIyaHVudGVyMg==", "username": "YWRtaW4=",
                     "tls.crt": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t".repeat(30)},
        }))?;
    }
    publish(&dir.join("upstream.url"), &server.url())?;
    stdin_closed().await;
    server.shutdown().await;
    Ok(())
}

/// A pod of about 2 KiB of JSON, shaped like a Deployment's replica.
fn bench_pod(namespace: &str, i: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("api-7d9f8b6c5-{i:05}"),
            "namespace": namespace,
            "labels": {"app": "api", "pod-template-hash": "7d9f8b6c5", "tier": "backend"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "api-7d9f8b6c5", "uid": "6f1c7e0a-3b52-4a57-9a8e-2f9d0c1b2a3e",
                "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "serviceAccountName": "api",
            "nodeName": format!("node-{}", i % 7),
            "containers": [{
                "name": "api",
                "image": "registry.example.com/team/api:1.42.0",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [
                    {"name": "LOG_LEVEL", "value": "info"},
                    {"name": "DATABASE_URL", "value": "postgres://api:hunter2hunter2@db.internal:5432/api"},
                    {"name": "REGION", "value": "eu-west-1"},
                ],
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"},
                              "limits": {"cpu": "1", "memory": "512Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                   "periodSeconds": 10},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/api"}],
            }],
            "volumes": [{"name": "config", "configMap": {"name": "api-config"}}],
        },
        "status": {
            "phase": "Running",
            "podIP": format!("10.244.{}.{}", i / 250, i % 250 + 2),
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-01T10:00:05Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-12-01T10:00:05Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T10:00:00Z"},
            ],
            "containerStatuses": [{"name": "api", "ready": true, "restartCount": 0,
                "image": "registry.example.com/team/api:1.42.0",
                "imageID": "registry.example.com/team/api@sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
                "containerID": "containerd://9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b",
                "state": {"running": {"startedAt": "2026-12-01T10:00:03Z"}}}],
        },
    })
}

/// The gateway's configuration: interception mode `none`, the policy, recording with the
/// write-ahead log, the test server as its upstream.
fn gateway_config(dir: &Path, listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<String> {
    let url = std::fs::read_to_string(dir.join("upstream.url"))?;
    let d = dir.display();
    Ok(format!(
        "node: bench-node
cluster: bench
listen:
  address: {listen}
interception:
  mode: none
upstream:
  url: {url}
  caFile: {d}/ca.crt
  tokenFile: {d}/token
  connectTimeout: 2s
tls:
  caCertFile: {d}/ca.crt
  caKeyFile: {d}/ca.key
  serverIps: [127.0.0.1]
policy:
  file: {d}/policy.yaml
recording:
  dir: {d}/recordings
  walDir: {d}/wal
  maxFileAge: 60s
admin:
  address: {admin}
shutdownGrace: 5s
",
        url = url.trim()
    ))
}

/// Starts the released `chaperone` binary as the gateway and waits until it accepts
/// connections.
fn spawn_gateway(dir: &Path) -> anyhow::Result<(Helper, SocketAddr)> {
    let bin = match std::env::var_os("CHAPERONE_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::current_exe()?.with_file_name("chaperone"),
    };
    ensure!(
        bin.is_file(),
        "{} not found: build the product first (`cargo build --release` at the workspace \
         root) or point $CHAPERONE_BIN at a chaperone binary",
        bin.display()
    );
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let config = dir.join("gateway.yaml");
    let log = dir.join("gateway.log");
    std::fs::write(&config, gateway_config(dir, listen, admin)?)?;
    let child = Command::new(&bin)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let mut gateway = Helper {
        name: "gateway",
        child,
        log: Some(log),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
        if let Some(status) = gateway.child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
            bail!(
                "the gateway ({}) exited early with {status}:\n{log}",
                bin.display()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "the gateway never listened on {listen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((gateway, listen))
}

/// A child that is stopped (stdin closed, or SIGTERM for the gateway, then killed if it
/// lingers) when dropped.
struct Helper {
    name: &'static str,
    child: Child,
    /// The gateway's log (its stderr): set for the `chaperone` process, which stops on
    /// SIGTERM rather than on a closed stdin.
    log: Option<PathBuf>,
}

impl Helper {
    fn spawn(role: &'static str, dir: &Path) -> anyhow::Result<Helper> {
        let child = Command::new(std::env::current_exe()?)
            .arg(role)
            .arg(dir)
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn the {role} process"))?;
        Ok(Helper {
            name: role,
            child,
            log: None,
        })
    }

    fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        if self.log.is_some() {
            let sent = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status()?;
            ensure!(sent.success(), "kill -TERM {} failed", self.child.id());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = match &self.log {
                    Some(path) => std::fs::read_to_string(path).unwrap_or_default(),
                    None => String::new(),
                };
                ensure!(
                    status.success(),
                    "{} process exited with {status}\n{log}",
                    self.name
                );
                // The gateway's last words: how many rows it recorded.
                if let Some(line) = log.lines().rfind(|l| l.contains("stopped")) {
                    eprintln!("{}: {line}", self.name);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} process did not stop within 20 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// nginx's master process; stopped with SIGTERM (SIGKILL would orphan the workers).
struct Nginx {
    child: Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn wait_for_file(path: &Path, helper: &mut Helper) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return Ok(text.trim().to_owned());
        }
        if let Some(status) = helper.child.try_wait()? {
            bail!("{} process exited early with {status}", helper.name);
        }
        if Instant::now() > deadline {
            bail!("{} never appeared", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_nginx(dir: &Path, upstream: SocketAddr) -> anyhow::Result<(Nginx, SocketAddr)> {
    // A self-signed certificate of the same kind (ECDSA P-256) as the gateway's; h2load
    // does not verify certificates.
    let (cert, key) = CertificateAuthority::generate("nginx-bench")?;
    std::fs::write(dir.join("nginx.crt"), cert.cert_pem())?;
    std::fs::write(dir.join("nginx.key"), key)?;
    std::fs::create_dir_all(dir.join("nginx-tmp"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let d = dir.display();
    let conf = format!(
        "worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
user root;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  # nginx 1.22 closes HTTP/2 and upstream connections after 1,000 requests by default;
  # clients of an API server keep theirs open.
  client_body_temp_path {d}/nginx-tmp/body;
  proxy_temp_path {d}/nginx-tmp/proxy;
  # exec and attach upgrade to WebSocket; every other request keeps its upstream
  # connection alive.
  map $http_upgrade $connection_upgrade {{
    default upgrade;
    '' '';
  }}
  upstream apiserver {{
    server {upstream};
    keepalive 64;
    keepalive_requests 10000000;
  }}
  server {{
    listen {addr} ssl http2;
    ssl_certificate {d}/nginx.crt;
    ssl_certificate_key {d}/nginx.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    keepalive_requests 10000000;
    location / {{
      proxy_pass https://apiserver;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_ssl_session_reuse on;
      proxy_buffering off;
    }}
  }}
}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .stdin(Stdio::null())
        .spawn()
        .context("spawn nginx (is it installed?)")?;
    let mut nginx = Nginx { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = nginx.child.try_wait()? {
            bail!(
                "nginx exited with {status}: {}",
                std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default()
            );
        }
        ensure!(Instant::now() < deadline, "nginx does not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((nginx, addr))
}

#[derive(Debug, Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    token: &'static str,
    /// The processes whose CPU time is the target's cost.
    pids: Vec<u32>,
    /// What to GET.
    path: &'static str,
}

fn h2load(target: &Target, extra: &[String]) -> anyhow::Result<String> {
    let out = Command::new("h2load")
        .args(extra)
        .arg("-H")
        .arg(format!("authorization: Bearer {}", target.token))
        .arg("-H")
        .arg("accept: application/json")
        .arg(format!("https://{}{}", target.addr, target.path))
        .output()
        .context("run h2load (is nghttp2-client installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "h2load against {} failed: {text}{}",
        target.name,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains("Application protocol: h2"),
        "h2load against {} did not negotiate h2: {text}",
        target.name
    );
    // Every request must have succeeded with a 2xx, or the figures measure errors.
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let requests = line("requests:");
    let codes = line("status codes:");
    let number = |s: &str, word: &str| -> Option<u64> {
        let words: Vec<&str> = s.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[1].trim_end_matches(',') == word)
            .and_then(|w| w[0].parse().ok())
    };
    // Timed runs count warm-up responses in the status codes but not in `done`, so check
    // for failures rather than comparing the two.
    let clean = number(&codes, "2xx").is_some_and(|n| n > 0)
        && ["3xx", "4xx", "5xx"]
            .iter()
            .all(|c| number(&codes, c) == Some(0))
        && ["failed", "errored", "timeout"]
            .iter()
            .all(|w| number(&requests, w) == Some(0));
    ensure!(
        clean,
        "h2load against {}: not every request succeeded:\n{text}",
        target.name
    );
    Ok(text)
}

/// Per-request latency at one connection with one stream: (p50, p99) in microseconds.
fn latency(target: &Target, dir: &Path) -> anyhow::Result<(f64, f64)> {
    latency_of(target, dir, LATENCY_REQUESTS, &[])
}

/// [`latency`] over `requests` requests, with more h2load options (`-d` for a POST body).
fn latency_of(
    target: &Target,
    dir: &Path,
    requests: usize,
    extra: &[String],
) -> anyhow::Result<(f64, f64)> {
    // Warm the connection pools and caches first.
    let mut warm = vec!["-c1".into(), "-m1".into(), "-n200".into()];
    warm.extend_from_slice(extra);
    h2load(target, &warm)?;
    let log = dir.join(format!("latency-{}.tsv", target.name));
    // h2load appends to its log file.
    let _ = std::fs::remove_file(&log);
    let mut args = vec![
        "-c1".into(),
        "-m1".into(),
        format!("-n{requests}"),
        format!("--log-file={}", log.display()),
    ];
    args.extend_from_slice(extra);
    h2load(target, &args)?;
    let text = std::fs::read_to_string(&log)?;
    let mut us: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            (cols.len() >= 3 && (cols[1] == "200" || cols[1] == "201"))
                .then(|| cols[2].trim().parse::<f64>().ok())
                .flatten()
        })
        .collect();
    ensure!(
        us.len() == requests,
        "{}: {} of {requests} requests logged with 200 or 201",
        target.name,
        us.len()
    );
    us.sort_by(f64::total_cmp);
    Ok((us[us.len() / 2], us[us.len() * 99 / 100]))
}

/// Requests per second with `clients` connections of one stream each.
fn throughput(target: &Target, clients: u32) -> anyhow::Result<f64> {
    let text = h2load(
        target,
        &[
            format!("-c{clients}"),
            "-m1".into(),
            format!("-D{THROUGHPUT_SECONDS}"),
            "--warm-up-time=1".into(),
        ],
    )?;
    // "finished in 5.00s, 7890.12 req/s, 3.21MB/s"
    text.lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|rest| rest.split(", ").nth(1))
        .and_then(|s| s.strip_suffix(" req/s"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no req/s in h2load's output:\n{text}"))
}

/// User + system CPU time (clock ticks) of a process, all its threads included, dead ones
/// too (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no field {n} in /proc/{pid}/stat"))
    };
    Ok(field(14)? + field(15)?)
}

fn clock_ticks_per_second() -> anyhow::Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("getconf CLK_TCK")
}

/// CPU time (us) the target's processes spend per request over [`CPU_REQUESTS`] requests
/// at 16 connections.
fn cpu_per_request(target: &Target, ticks_per_second: f64) -> anyhow::Result<f64> {
    let total = |pids: &[u32]| -> anyhow::Result<u64> {
        pids.iter()
            .map(|&p| cpu_ticks(p))
            .sum::<anyhow::Result<u64>>()
    };
    let before = total(&target.pids)?;
    h2load(
        target,
        &["-c16".into(), "-m1".into(), format!("-n{CPU_REQUESTS}")],
    )?;
    let after = total(&target.pids)?;
    Ok((after - before) as f64 / ticks_per_second * 1e6 / CPU_REQUESTS as f64)
}

/// Chaperone's CPU per request over nginx's, one ratio per round of two runs back to back.
fn paired_cpu_ratios(
    nginx: &Target,
    chaperone: &Target,
    ticks_per_second: f64,
) -> anyhow::Result<Vec<f64>> {
    (1..=CPU_ROUNDS)
        .map(|round| {
            let n = cpu_per_request(nginx, ticks_per_second)?;
            let c = cpu_per_request(chaperone, ticks_per_second)?;
            eprintln!(
                "http_bench: CPU round {round}/{CPU_ROUNDS}: nginx {n:.1} us/req, chaperone {c:.1} us/req"
            );
            anyhow::ensure!(n > 0.0, "nginx used no CPU time in round {round}");
            Ok(c / n)
        })
        .collect()
}

/// One latency round: (p50, p99) of `direct`, `nginx` and `chaperone`, in target order.
type LatencyRound = [(f64, f64); 3];

/// [`LATENCY_ROUNDS`] rounds of [`ROUND_REQUESTS`]-request latency runs over `targets`
/// (direct, nginx, chaperone), each round starting one target later than the last.
fn latency_rounds(targets: &[Target; 3], dir: &Path) -> anyhow::Result<Vec<LatencyRound>> {
    (0..LATENCY_ROUNDS)
        .map(|round| {
            let mut figures = [(0.0, 0.0); 3];
            for i in 0..targets.len() {
                let at = (round + i) % targets.len();
                figures[at] = latency_of(&targets[at], dir, ROUND_REQUESTS, &[])?;
            }
            let [d, n, c] = figures;
            eprintln!(
                "http_bench: latency round {}/{LATENCY_ROUNDS}: p50 direct {:.0}, nginx {:.0} (+{:.0}), chaperone {:.0} (+{:.0}) us",
                round + 1,
                d.0,
                n.0,
                n.0 - d.0,
                c.0,
                c.0 - d.0
            );
            Ok(figures)
        })
        .collect()
}

/// Each round's added p50 (`p99` false) or p99 of target `at` over the same round's direct.
fn added_per_round(rounds: &[LatencyRound], at: usize, p99: bool) -> Vec<f64> {
    let pick = |f: (f64, f64)| if p99 { f.1 } else { f.0 };
    rounds.iter().map(|r| pick(r[at]) - pick(r[0])).collect()
}

/// nginx's master process and its workers.
fn nginx_pids(master: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default();
    std::iter::once(master)
        .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect()
}

/// `VmRSS` and `VmHWM` (KiB) of a process.
fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Summed `VmRSS` (KiB) of nginx's master and its workers.
fn nginx_rss_kib(master: u32) -> u64 {
    nginx_pids(master)
        .into_iter()
        .filter_map(|pid| rss_kib(pid).ok())
        .map(|(rss, _)| rss)
        .sum()
}

/// One target's figures, one value per pass.
#[derive(Debug, Default, Clone)]
struct Figures {
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    rps_c16: Vec<f64>,
    rps_c64: Vec<f64>,
    cpu_us: Vec<f64>,
}

impl Figures {
    /// (summary.json key, per-pass values), in the table's column order.
    fn columns(&self) -> [(&'static str, &[f64]); 5] {
        [
            ("p50_us", &self.p50_us),
            ("p99_us", &self.p99_us),
            ("rps_c16", &self.rps_c16),
            ("rps", &self.rps_c64),
            ("cpu_us_per_req", &self.cpu_us),
        ]
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `median [min-max]` of per-pass values.
fn spread(xs: &[f64]) -> String {
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.len() > 1 {
        format!("{:.0} [{min:.0}-{max:.0}]", median(xs))
    } else {
        format!("{:.0}", median(xs))
    }
}

/// Starts the upstream and the gateway as in a run, prints where they listen and their
/// pids, and keeps them up until stdin closes: for profiling one of them under load
/// (`perf record -g -p <pid>` while h2load runs against it).
fn hold() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    prepare(dir)?;
    let mut upstream = Helper::spawn("upstream", dir)?;
    let url = wait_for_file(&dir.join("upstream.url"), &mut upstream)?;
    let (gateway, gateway_addr) = spawn_gateway(dir)?;
    println!(
        "upstream {url} pid {}\ngateway https://{gateway_addr} pid {}\n\
         h2load -c1 -m1 -n20000 -H 'authorization: Bearer {POD_TOKEN}' -H 'accept: application/json' https://{gateway_addr}/api/v1/namespaces/default/pods/web-0\n\
         (close stdin to stop)",
        upstream.child.id(),
        gateway.child.id()
    );
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    gateway.stop()?;
    upstream.stop()
}

/// The CA, tokens and policy the upstream and the gateway read from `dir`.
fn prepare(dir: &Path) -> anyhow::Result<()> {
    let (ca, key) = CertificateAuthority::generate("http-bench-ca")?;
    std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;
    std::fs::write(dir.join("ca.key"), key)?;
    std::fs::write(dir.join("token"), TOKEN)?;
    std::fs::write(dir.join("policy.yaml"), POLICY)?;
    Ok(())
}

/// Latency of an unmasked and a masked `get secret` through the gateway (medians over the
/// passes of each pass's p50 and p99, microseconds).
struct MaskedLatency {
    plain: [f64; 2],
    masked: [f64; 2],
}

impl MaskedLatency {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "unmasked_p50_us": self.plain[0].round(),
            "unmasked_p99_us": self.plain[1].round(),
            "masked_p50_us": self.masked[0].round(),
            "masked_p99_us": self.masked[1].round(),
            "added_p50_us": (self.masked[0] - self.plain[0]).round(),
            "added_p99_us": (self.masked[1] - self.plain[1]).round(),
        })
    }
}

fn masked_secret_latency(dir: &Path, gateway: SocketAddr) -> anyhow::Result<MaskedLatency> {
    let targets = [
        Target {
            name: "secret-unmasked",
            addr: gateway,
            token: POD_TOKEN,
            pids: Vec::new(),
            path: SECRET_PLAIN,
        },
        Target {
            name: "secret-masked",
            addr: gateway,
            token: POD_TOKEN,
            pids: Vec::new(),
            path: SECRET_MASKED,
        },
    ];
    let mut p50 = [Vec::new(), Vec::new()];
    let mut p99 = [Vec::new(), Vec::new()];
    for pass in 1..=PASSES {
        for (i, t) in targets.iter().enumerate() {
            let (a, b) = latency(t, dir)?;
            eprintln!(
                "http_bench: pass {pass}/{PASSES}: {}: p50 {a:.0} us, p99 {b:.0} us",
                t.name
            );
            p50[i].push(a);
            p99[i].push(b);
        }
    }
    Ok(MaskedLatency {
        plain: [median(&p50[0]), median(&p99[0])],
        masked: [median(&p50[1]), median(&p99[1])],
    })
}

fn print_masked(m: &MaskedLatency) {
    println!(
        "GET of a ~1.6 KB Secret through chaperone, median of {PASSES} passes (h2load -c1 -m1 -n{LATENCY_REQUESTS})"
    );
    println!(
        "  unmasked p50 {:.0} us, p99 {:.0} us; masked p50 {:.0} us, p99 {:.0} us; masking adds p50 {:+.0} us, p99 {:+.0} us",
        m.plain[0],
        m.plain[1],
        m.masked[0],
        m.masked[1],
        m.masked[0] - m.plain[0],
        m.masked[1] - m.plain[1]
    );
}

/// What agents do besides small GETs, per target: (p50, p99) of a `list` of 500 pods, of
/// a `create` (through the gateway's write-ahead log), and the memory each of 1,000 open
/// idle watches costs the proxy's processes.
#[derive(Debug, Default, Clone)]
struct Scenarios {
    list: Vec<[f64; 2]>,
    list_masked: Vec<[f64; 2]>,
    create: Vec<[f64; 2]>,
    watch_kib: Option<f64>,
    /// Milliseconds from sending a watch to its 1,000th event.
    watch_ms: Vec<f64>,
    watch_masked_ms: Vec<f64>,
    /// Exec stdout MB/s.
    exec: Vec<f64>,
    exec_masked: Vec<f64>,
}

/// Exec stdout throughput (MB/s) through the target with real kubectl (WebSocket, as
/// kubectl 1.32 speaks it): `kubectl exec POD -- head -c EXEC_BYTES /dev/zero` into
/// /dev/null, timed, less the time of `kubectl exec POD -- true` (kubectl's start-up and
/// the session's set-up), each the best of two runs.
fn exec_mb_per_s(target: &Target, dir: &Path, pod: &str) -> anyhow::Result<f64> {
    let kubeconfig = dir.join(format!("kubeconfig-{}", target.name));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: b\n  cluster:\n    server: https://{}\n    insecure-skip-tls-verify: true\nusers:\n- name: b\n  user:\n    token: {}\ncontexts:\n- name: b\n  context: {{cluster: b, user: b, namespace: default}}\ncurrent-context: b\n",
            target.addr, target.token
        ),
    )?;
    let timed = |args: &[&str]| -> anyhow::Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let started = Instant::now();
            let out = Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["exec", pod, "--"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .context("run kubectl (is it installed?)")?;
            ensure!(
                out.status.success(),
                "{}: kubectl exec {args:?} failed: {}",
                target.name,
                String::from_utf8_lossy(&out.stderr)
            );
            best = best.min(started.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let empty = timed(&["true"])?;
    let full = timed(&["head", "-c", &EXEC_BYTES.to_string(), "/dev/zero"])?;
    Ok(EXEC_BYTES as f64 / (full - empty).max(1e-3) / 1e6)
}

/// Milliseconds from starting a watch of `namespace`'s pods from resourceVersion 0 (curl
/// over HTTP/2, as kubectl would) until its `WATCH_EVENTS`th event has arrived.
fn watch_events_ms(target: &Target, namespace: &str) -> anyhow::Result<f64> {
    use std::io::BufRead as _;
    let url = format!(
        "https://{}/api/v1/namespaces/{namespace}/pods?watch=true&resourceVersion=0&timeoutSeconds=60",
        target.addr
    );
    let started = Instant::now();
    // -k: nginx's certificate is self-signed; everything here is on loopback.
    let mut child = Command::new("curl")
        .args(["-sSNk", "--http2", "-H"])
        .arg(format!("authorization: Bearer {}", target.token))
        .args(["-H", "accept: application/json", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("run curl (is it installed?)")?;
    let stdout = child.stdout.take().context("curl stdout")?;
    let mut events = 0;
    let mut masked_seen = false;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        ensure!(
            line.starts_with('{') && line.contains("\"type\":\"ADDED\""),
            "{}: unexpected watch line {line:.200}",
            target.name
        );
        masked_seen |= line.contains("**masked");
        events += 1;
        if events == WATCH_EVENTS {
            break;
        }
    }
    let elapsed = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    ensure!(
        events == WATCH_EVENTS,
        "{}: the watch ended after {events} of {WATCH_EVENTS} events",
        target.name
    );
    ensure!(
        masked_seen == namespace.ends_with("-masked"),
        "{}: masking of {namespace} is not what the policy says",
        target.name
    );
    Ok(elapsed.as_secs_f64() * 1000.0)
}

fn scenarios(target: &Target, dir: &Path, pass: usize) -> anyhow::Result<Scenarios> {
    let mut out = Scenarios::default();
    let list = Target {
        path: LIST_PATH,
        ..target.clone()
    };
    out.list
        .push(pair(latency_of(&list, dir, SCENARIO_REQUESTS, &[])?));
    if target.name == "chaperone" {
        let masked = Target {
            path: LIST_MASKED_PATH,
            ..target.clone()
        };
        out.list_masked
            .push(pair(latency_of(&masked, dir, SCENARIO_REQUESTS, &[])?));
    }
    out.watch_ms.push(watch_events_ms(target, "watch")?);
    out.exec.push(exec_mb_per_s(target, dir, "web-0")?);
    if target.name == "chaperone" {
        out.watch_masked_ms
            .push(watch_events_ms(target, "watch-masked")?);
        out.exec_masked.push(exec_mb_per_s(target, dir, "web-1")?);
    }
    // generateName: every create makes a new ConfigMap, so none conflicts.
    let body = dir.join("create.json");
    std::fs::write(
        &body,
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"generateName": format!("bench-{}-{pass}-", target.name), "labels": {"app": "api"}},
            "data": {"LOG_LEVEL": "info", "FEATURE_FLAGS": "a,b,c,d", "ENDPOINT": "https://api.example.internal:8443/v2", "TIMEOUT": "30s"},
        }))?,
    )?;
    let create = Target {
        path: CREATE_PATH,
        ..target.clone()
    };
    out.create.push(pair(latency_of(
        &create,
        dir,
        SCENARIO_REQUESTS,
        &[
            format!("-d{}", body.display()),
            "-H".into(),
            "content-type: application/json".into(),
        ],
    )?));
    eprintln!(
        "http_bench:   list of {LIST_PODS} pods p50 {:.0} us{}, create p50 {:.0} us, watch of {WATCH_EVENTS} events {:.1} ms{}",
        out.list[0][0],
        out.list_masked
            .first()
            .map(|m| format!(" (masked {:.0} us)", m[0]))
            .unwrap_or_default(),
        out.create[0][0],
        out.watch_ms[0],
        out.watch_masked_ms
            .first()
            .map(|m| format!(" (masked {m:.1} ms)"))
            .unwrap_or_default(),
    );
    eprintln!(
        "http_bench:   exec stdout {:.0} MB/s{}",
        out.exec[0],
        out.exec_masked
            .first()
            .map(|m| format!(" (masked {m:.0} MB/s)"))
            .unwrap_or_default(),
    );
    Ok(out)
}

/// Prints the scenario table and returns it for `summary.json`.
fn print_scenarios(targets: &[Target], agents: &[Scenarios]) -> serde_json::Value {
    let col = |xs: &[[f64; 2]], i: usize| xs.iter().map(|x| x[i]).collect::<Vec<f64>>();
    println!(
        "What agents do, median [min-max] of {PASSES} passes (h2load -c1 -m1 -n{SCENARIO_REQUESTS}); \
         memory per idle watch with {IDLE_WATCHES} open"
    );
    println!(
        "  {:<10} {:>22} {:>22} {:>22} {:>22} {:>16} {:>20} {:>20} {:>16} {:>18}",
        "target",
        "list p50 us",
        "list masked p50 us",
        "create p50 us",
        "create p99 us",
        "KiB/watch",
        "1k events ms",
        "1k masked ms",
        "exec MB/s",
        "exec masked MB/s"
    );
    let mut json = serde_json::Map::new();
    for (t, a) in targets.iter().zip(agents) {
        let masked = if a.list_masked.is_empty() {
            "-".to_owned()
        } else {
            spread(&col(&a.list_masked, 0))
        };
        let or_dash = |xs: &[f64]| {
            if xs.is_empty() {
                "-".to_owned()
            } else {
                spread(xs)
            }
        };
        println!(
            "  {:<10} {:>22} {:>22} {:>22} {:>22} {:>16} {:>20} {:>20} {:>16} {:>18}",
            t.name,
            spread(&col(&a.list, 0)),
            masked,
            spread(&col(&a.create, 0)),
            spread(&col(&a.create, 1)),
            a.watch_kib.map_or("-".to_owned(), |k| format!("{k:.1}")),
            or_dash(&a.watch_ms),
            or_dash(&a.watch_masked_ms),
            or_dash(&a.exec),
            or_dash(&a.exec_masked),
        );
        let m = |xs: &[[f64; 2]], i: usize| {
            let c = col(xs, i);
            (!c.is_empty()).then(|| median(&c).round())
        };
        json.insert(
            t.name.into(),
            serde_json::json!({
                "list_500_pods_p50_us": m(&a.list, 0),
                "list_500_pods_p99_us": m(&a.list, 1),
                "list_500_pods_masked_p50_us": m(&a.list_masked, 0),
                "list_500_pods_masked_p99_us": m(&a.list_masked, 1),
                "create_p50_us": m(&a.create, 0),
                "create_p99_us": m(&a.create, 1),
                "idle_watch_kib": a.watch_kib.map(|k| (k * 10.0).round() / 10.0),
                "watch_1000_events_ms": (!a.watch_ms.is_empty()).then(|| median(&a.watch_ms)),
                "watch_1000_events_masked_ms": (!a.watch_masked_ms.is_empty()).then(|| median(&a.watch_masked_ms)),
                "exec_mb_per_s": (!a.exec.is_empty()).then(|| median(&a.exec).round()),
                "exec_masked_mb_per_s": (!a.exec_masked.is_empty()).then(|| median(&a.exec_masked).round()),
                "passes": {
                    "list_500_pods_p50_us": col(&a.list, 0),
                    "create_p50_us": col(&a.create, 0),
                    // Not `watch_1000_events_ms`: xtask finds figures by the first
                    // occurrence of their key after the target's name.
                    "watch_ms": a.watch_ms,
                    "exec_mb_per_s": a.exec,
                },
            }),
        );
    }
    serde_json::Value::Object(json)
}

fn pair((a, b): (f64, f64)) -> [f64; 2] {
    [a, b]
}

/// Memory (KiB) the target's processes hold per open idle watch: `IDLE_WATCHES` watches
/// with no events (an empty namespace), opened at once by h2load over as many
/// connections, RSS read while they are all open.
fn idle_watch_kib(target: &Target) -> anyhow::Result<f64> {
    let rss = |pids: &[u32]| -> u64 {
        pids.iter()
            .filter_map(|p| rss_kib(*p).ok())
            .map(|(r, _)| r)
            .sum()
    };
    let before = rss(&target.pids);
    let url = format!(
        "https://{}/api/v1/namespaces/quiet/configmaps?watch=true&timeoutSeconds=6",
        target.addr
    );
    let mut child = Command::new("h2load")
        .args([
            format!("-c{IDLE_WATCHES}"),
            format!("-n{IDLE_WATCHES}"),
            "-m1".into(),
            "-H".into(),
            format!("authorization: Bearer {}", target.token),
            url,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("run h2load")?;
    // The connections open within a second or two; the watches end after 6 s.
    std::thread::sleep(Duration::from_secs(4));
    let during = rss(&target.pids);
    let status = child.wait()?;
    ensure!(status.success(), "h2load holding watches failed: {status}");
    Ok(during.saturating_sub(before) as f64 / IDLE_WATCHES as f64)
}

/// Only the masked vs unmasked `get secret` figure (no nginx, no throughput runs).
/// Drives the gateway once through the benchmark's mix, for a profile-guided build
/// (`cargo xtask dist` runs it against an instrumented `chaperone` in `$CHAPERONE_BIN`):
/// small gets at one and at 16 connections, a plain and a masked Secret, and what agents
/// do (lists plain and masked, watches, exec with kubectl, creates through the log).
fn train() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    prepare(dir)?;
    let mut upstream = Helper::spawn("upstream", dir)?;
    wait_for_file(&dir.join("upstream.url"), &mut upstream)?;
    let (gateway, addr) = spawn_gateway(dir)?;
    let target = Target {
        name: "chaperone",
        addr,
        token: POD_TOKEN,
        pids: vec![gateway.child.id()],
        path: PATH,
    };
    for (connections, requests) in [(1, 5000), (16, 30_000)] {
        h2load(
            &target,
            &[
                format!("-c{connections}"),
                "-m1".into(),
                format!("-n{requests}"),
            ],
        )?;
    }
    masked_secret_latency(dir, addr)?;
    scenarios(&target, dir, 0)?;
    gateway.stop()?;
    upstream.stop()?;
    eprintln!("http_bench: trained the gateway at {addr}");
    Ok(())
}

fn masked_only() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    prepare(dir)?;
    let mut upstream = Helper::spawn("upstream", dir)?;
    wait_for_file(&dir.join("upstream.url"), &mut upstream)?;
    let (gateway, gateway_addr) = spawn_gateway(dir)?;
    let masked = masked_secret_latency(dir, gateway_addr)?;
    gateway.stop()?;
    upstream.stop()?;
    print_masked(&masked);
    Ok(())
}

fn orchestrate() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    prepare(dir)?;

    let mut upstream = Helper::spawn("upstream", dir)?;
    let url = wait_for_file(&dir.join("upstream.url"), &mut upstream)?;
    let upstream_addr: SocketAddr = url
        .strip_prefix("https://")
        .unwrap_or(&url)
        .parse()
        .with_context(|| format!("upstream url {url}"))?;
    let (gateway, gateway_addr) = spawn_gateway(dir)?;
    let gateway_pid = gateway.child.id();
    let (idle_rss, _) = rss_kib(gateway_pid)?;
    // Let the gateway finish starting (its first recording file, the log's segment).
    std::thread::sleep(Duration::from_millis(500));
    let (nginx, nginx_addr) = start_nginx(dir, upstream_addr)?;

    let targets = [
        Target {
            name: "direct",
            addr: upstream_addr,
            token: TOKEN,
            pids: vec![upstream.child.id()],
            path: PATH,
        },
        Target {
            name: "nginx",
            addr: nginx_addr,
            token: TOKEN,
            pids: nginx_pids(nginx.child.id()),
            path: PATH,
        },
        Target {
            name: "chaperone",
            addr: gateway_addr,
            token: POD_TOKEN,
            pids: vec![gateway_pid],
            path: PATH,
        },
    ];
    // Memory per idle watch first, while the proxies are fresh: after the throughput runs
    // the gateway's allocator holds freed memory it would reuse, hiding what watches cost.
    let watch_kib: Vec<Option<f64>> = targets
        .iter()
        .map(|t| (t.name != "direct").then(|| idle_watch_kib(t)).transpose())
        .collect::<anyhow::Result<_>>()?;
    let ticks_per_second = clock_ticks_per_second()?;
    let mut figures = vec![Figures::default(); targets.len()];
    for pass in 1..=PASSES {
        for (t, f) in targets.iter().zip(figures.iter_mut()) {
            eprintln!("http_bench: pass {pass}/{PASSES}: {}", t.name);
            let (p50, p99) = latency(t, dir)?;
            f.p50_us.push(p50);
            f.p99_us.push(p99);
            f.rps_c16.push(throughput(t, 16)?);
            f.rps_c64.push(throughput(t, 64)?);
            f.cpu_us.push(cpu_per_request(t, ticks_per_second)?);
            eprintln!(
                "http_bench:   p50 {:.0} us, p99 {:.0} us, c16 {:.0} req/s, c64 {:.0} req/s, cpu {:.0} us/req",
                p50,
                p99,
                f.rps_c16.last().copied().unwrap_or_default(),
                f.rps_c64.last().copied().unwrap_or_default(),
                f.cpu_us.last().copied().unwrap_or_default(),
            );
        }
    }
    let cpu_ratios = paired_cpu_ratios(&targets[1], &targets[2], ticks_per_second)?;
    let rounds = latency_rounds(&targets, dir)?;
    let mut agents = vec![Scenarios::default(); targets.len()];
    for pass in 1..=PASSES {
        for (t, a) in targets.iter().zip(agents.iter_mut()) {
            eprintln!(
                "http_bench: pass {pass}/{PASSES}: {} (list, watch, create)",
                t.name
            );
            let s = scenarios(t, dir, pass)?;
            a.list.extend(s.list);
            a.list_masked.extend(s.list_masked);
            a.create.extend(s.create);
            a.watch_ms.extend(s.watch_ms);
            a.watch_masked_ms.extend(s.watch_masked_ms);
            a.exec.extend(s.exec);
            a.exec_masked.extend(s.exec_masked);
        }
    }
    for (a, kib) in agents.iter_mut().zip(&watch_kib) {
        a.watch_kib = *kib;
    }
    let masked = masked_secret_latency(dir, gateway_addr)?;
    let (rss, hwm) = rss_kib(gateway_pid)?;
    let nginx_rss = nginx_rss_kib(nginx.child.id());
    drop(nginx);
    gateway.stop()?;
    upstream.stop()?;

    let med = |f: &Figures| f.columns().map(|(_, xs)| median(xs));
    let [direct, ngx, chap] = [med(&figures[0]), med(&figures[1]), med(&figures[2])];
    println!(
        "GET {PATH} over TLS + HTTP/2; median [min-max] of {PASSES} passes \
         (latency: h2load -c1 -m1 -n{LATENCY_REQUESTS} --log-file; throughput: h2load -cN -m1 -D{THROUGHPUT_SECONDS}; \
         CPU: user + system time of the target's processes over h2load -c16 -m1 -n{CPU_REQUESTS})"
    );
    println!(
        "  {:<10} {:>18} {:>18} {:>9} {:>9} {:>22} {:>22} {:>16}",
        "target", "p50 us", "p99 us", "+p50 us", "+p99 us", "req/s c16", "req/s c64", "cpu us/req"
    );
    for (t, f) in targets.iter().zip(&figures) {
        let m = med(f);
        println!(
            "  {:<10} {:>18} {:>18} {:>9.0} {:>9.0} {:>22} {:>22} {:>16}",
            t.name,
            spread(&f.p50_us),
            spread(&f.p99_us),
            m[0] - direct[0],
            m[1] - direct[1],
            spread(&f.rps_c16),
            spread(&f.rps_c64),
            spread(&f.cpu_us),
        );
    }
    // Noise can make nginx's added latency zero or negative; a ratio then means nothing.
    let ratio = |i: usize| {
        let (c, n) = (chap[i] - direct[i], ngx[i] - direct[i]);
        if n > 0.0 {
            format!("{:.2}x", c / n)
        } else {
            format!("n/a (nginx added {n:.0} us)")
        }
    };
    println!(
        "  chaperone / nginx: added p50 {}, added p99 {}, throughput c16 {:.0}%, c64 {:.0}%, CPU per request {:.0}%",
        ratio(0),
        ratio(1),
        100.0 * chap[2] / ngx[2],
        100.0 * chap[3] / ngx[3],
        100.0 * chap[4] / ngx[4],
    );
    println!(
        "  CPU per request, chaperone / nginx in {CPU_ROUNDS} back-to-back rounds: {:.2}x [{:.2}-{:.2}]",
        median(&cpu_ratios),
        cpu_ratios.iter().copied().fold(f64::INFINITY, f64::min),
        cpu_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    let added = |at: usize, p99: bool| median(&added_per_round(&rounds, at, p99));
    println!(
        "  added latency in {LATENCY_ROUNDS} back-to-back rounds (h2load -c1 -m1 -n{ROUND_REQUESTS}, order rotating): \
         p50 nginx {} us, chaperone {} us; p99 nginx {} us, chaperone {} us",
        spread(&added_per_round(&rounds, 1, false)),
        spread(&added_per_round(&rounds, 2, false)),
        spread(&added_per_round(&rounds, 1, true)),
        spread(&added_per_round(&rounds, 2, true)),
    );
    // Both proxies against each other round by round: no direct run in the difference, so
    // direct's own swings (its p50 jumps between about 25 and 55 us with where the
    // scheduler puts h2load and the server) cancel out.
    let over_nginx: Vec<f64> = rounds.iter().map(|r| r[2].0 - r[1].0).collect();
    println!(
        "  chaperone's p50 minus nginx's, round by round: {} us",
        spread(&over_nginx)
    );
    println!(
        "  chaperone RSS: {idle_rss} KiB idle, {rss} KiB after the runs (peak {hwm} KiB); \
         nginx (master + workers): {nginx_rss} KiB"
    );

    let entry = |f: &Figures| {
        let mut medians = serde_json::Map::new();
        let mut passes = serde_json::Map::new();
        for (key, xs) in f.columns() {
            let m = median(xs);
            // One decimal for CPU time (tens of us), whole units for the rest.
            let rounded = if key == "cpu_us_per_req" {
                (m * 10.0).round() / 10.0
            } else {
                m.round()
            };
            medians.insert(key.into(), rounded.into());
            passes.insert(key.into(), xs.to_vec().into());
        }
        (
            serde_json::Value::Object(medians),
            serde_json::Value::Object(passes),
        )
    };
    let (direct_entry, direct_passes) = entry(&figures[0]);
    let (mut nginx_entry, nginx_passes) = entry(&figures[1]);
    let (mut chaperone, chaperone_passes) = entry(&figures[2]);
    chaperone["rss_kib"] = rss.into();
    chaperone["rss_peak_kib"] = hwm.into();
    chaperone["rss_idle_kib"] = idle_rss.into();
    chaperone["cpu_vs_nginx_paired"] = ((median(&cpu_ratios) * 1000.0).round() / 1000.0).into();
    chaperone["p50_minus_nginx_paired_us"] = median(&over_nginx).round().into();
    for (entry, at) in [(&mut nginx_entry, 1), (&mut chaperone, 2)] {
        entry["added_p50_paired_us"] = added(at, false).round().into();
        entry["added_p99_paired_us"] = added(at, true).round().into();
    }
    nginx_entry["rss_kib"] = nginx_rss.into();
    // `passes` sorts after the targets, so a reader scanning for a target's first `rps`
    // meets the median, not a per-pass list.
    print_masked(&masked);
    let agent_json = print_scenarios(&targets, &agents);
    let summary = serde_json::json!({
        "direct": direct_entry,
        "nginx": nginx_entry,
        "chaperone": chaperone,
        "passes": {
            "direct": direct_passes,
            "nginx": nginx_passes,
            "chaperone": chaperone_passes,
            "cpu_vs_nginx_paired": cpu_ratios,
            "latency_rounds": rounds
                .iter()
                .map(|r| {
                    let figure = |(p50, p99): (f64, f64)| serde_json::json!({"p50_us": p50, "p99_us": p99});
                    serde_json::json!({"direct": figure(r[0]), "nginx": figure(r[1]), "chaperone": figure(r[2])})
                })
                .collect::<Vec<_>>(),
        },
        "masked_get_secret": masked.json(),
        "scenarios": agent_json,
    });
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(())
}
