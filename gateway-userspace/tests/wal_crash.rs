//! No mutation without a durable record, tested the hard way: the gateway runs as its own
//! process (`chaperone run`) in front of the API test server, several official Python
//! clients create ConfigMaps through it as fast as they can, and the gateway is killed
//! with SIGKILL at random points and restarted. Afterwards every ConfigMap the API server
//! stored has a `create` row whose outcome is `forwarded` or `unknown`, every ConfigMap a
//! client saw created is stored, and every recorded file reads.
//!
//! The same with the recording disk full (a small tmpfs, root only): mutating requests get
//! a 503 naming the cause, `/readyz` says so, recording recovers by itself once space is
//! freed, and nothing applied is left without a row.
//!
//! And the evidence leaves the node: with `recording.upload` pointing at moto's S3 server,
//! the daemon ships its files and manifest, and `chaperone verify s3://...` passes on the
//! copy.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use chaperone_testkit::{
    apiserver::{ApiServerConfig, TestApiServer},
    local::local_config,
};
use gateway_userspace::{
    recorder::{self, Outcome, RequestRecord},
    request::Verb,
    tls::CertificateAuthority,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
};

const GATEWAY_TOKEN: &str = "gateway-token-wal";
const CLIENTS: usize = 4;

/// Creates ConfigMaps until the stop file appears; one line per attempt, so the test
/// knows every name that may have reached the API server and what the client saw.
const CLIENT: &str = r#"
import os, sys, time
from kubernetes import client, config
cfg = client.Configuration()
config.load_kube_config(config_file=sys.argv[1], client_configuration=cfg)
cfg.retries = False
api = client.CoreV1Api(client.ApiClient(cfg))
prefix, stop = sys.argv[2], sys.argv[3]
i = 0
while not os.path.exists(stop):
    name = f"{prefix}-{i}"
    i += 1
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"n": str(i)})
    try:
        api.create_namespaced_config_map("default", body, _request_timeout=10)
        print("created", name, flush=True)
    except client.exceptions.ApiException as e:
        reason = (e.body or "").replace("\n", " ")[:300]
        print("failed", name, e.status, reason, flush=True)
        time.sleep(0.02)
    except Exception as e:
        print("error", name, type(e).__name__, flush=True)
        time.sleep(0.02)
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("free port: {e}"))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The API test server, the gateway's config file and the clients' kubeconfig.
struct Setup {
    dir: tempfile::TempDir,
    apiserver: TestApiServer,
    config: PathBuf,
    kubeconfig: PathBuf,
    recordings: PathBuf,
    admin: SocketAddr,
    log: PathBuf,
}

async fn setup(recordings: Option<PathBuf>) -> Setup {
    setup_with(recordings, |_| {}).await
}

async fn setup_with(
    recordings: Option<PathBuf>,
    adjust: impl FnOnce(&mut gateway_userspace::config::Config),
) -> Setup {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (ca, ca_key) =
        CertificateAuthority::generate("wal-crash-ca").unwrap_or_else(|e| panic!("CA: {e}"));
    let ca_pem = ca.cert_pem().to_owned();
    write(&dir.path().join("ca.crt"), &ca_pem);
    write(&dir.path().join("ca.key"), &ca_key);
    write(&dir.path().join("token"), GATEWAY_TOKEN);
    let apiserver = TestApiServer::start(ApiServerConfig {
        ca: Some(Arc::new(ca)),
        tokens: vec![GATEWAY_TOKEN.to_owned()],
        ..ApiServerConfig::default()
    })
    .await
    .unwrap_or_else(|e| panic!("start API test server: {e}"));
    let mut config =
        local_config(dir.path(), &apiserver.url()).unwrap_or_else(|e| panic!("config: {e}"));
    // Fixed ports, so clients reach the restarted gateway where they left it.
    config.listen.address = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.admin.address = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.recording.max_file_age = Duration::from_secs(1);
    if let Some(recordings) = recordings {
        config.recording.dir = recordings;
    }
    adjust(&mut config);
    let yaml = serde_norway::to_string(&config).unwrap_or_else(|e| panic!("yaml: {e}"));
    let config_file = dir.path().join("chaperone.yaml");
    write(&config_file, &yaml);
    let kubeconfig = dir.path().join("kubeconfig");
    write(
        &kubeconfig,
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gw\n  cluster:\n    server: https://{}\n    certificate-authority: {}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: gw\n  context:\n    cluster: gw\n    user: agent\n    namespace: default\n\
             current-context: gw\n",
            config.listen.address,
            dir.path().join("ca.crt").display()
        ),
    );
    Setup {
        log: dir.path().join("gateway.log"),
        recordings: config.recording.dir.clone(),
        admin: config.admin.address,
        config: config_file,
        kubeconfig,
        apiserver,
        dir,
    }
}

use chaperone_testkit::local::admin_get;

fn gateway_log(setup: &Setup) -> String {
    let bytes = std::fs::read(&setup.log).unwrap_or_default();
    let start = bytes.len().saturating_sub(4000);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Starts `chaperone run` and waits until `/readyz` answers (any status).
async fn start_gateway(setup: &Setup) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&setup.log)
        .unwrap_or_else(|e| panic!("gateway log: {e}"));
    let log2 = log
        .try_clone()
        .unwrap_or_else(|e| panic!("gateway log: {e}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .arg("run")
        .arg("--config")
        .arg(&setup.config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn chaperone: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the gateway exited at start ({status}):\n{}",
                gateway_log(setup)
            );
        }
        if admin_get(setup.admin, "/readyz").await.is_some() {
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not come up:\n{}",
            gateway_log(setup)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kill9(mut child: Child) {
    child
        .start_kill()
        .unwrap_or_else(|e| panic!("SIGKILL the gateway: {e}"));
    let _ = child.wait().await;
}

async fn stop_gracefully(setup: &Setup, mut child: Child) {
    let pid = child.id().unwrap_or_else(|| panic!("gateway already gone")) as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap_or_else(|e| panic!("SIGTERM the gateway: {e}"));
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(Ok(status)) => assert!(
            status.success(),
            "the gateway failed on shutdown ({status}):\n{}",
            gateway_log(setup)
        ),
        other => panic!("the gateway did not stop: {other:?}"),
    }
}

fn start_clients(setup: &Setup, stop: &Path) -> Vec<Child> {
    (0..CLIENTS)
        .map(|i| {
            Command::new("python3")
                .arg("-c")
                .arg(CLIENT)
                .arg(&setup.kubeconfig)
                .arg(format!("cm-{i}"))
                .arg(stop)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn the Python client: {e}"))
        })
        .collect()
}

/// What the clients printed: name -> (outcome word, status code if any, rest).
async fn stop_clients(stop: &Path, clients: Vec<Child>) -> BTreeMap<String, (String, String)> {
    write(stop, "stop");
    let mut seen = BTreeMap::new();
    for client in clients {
        let out = tokio::time::timeout(Duration::from_secs(60), client.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("a client did not stop"))
            .unwrap_or_else(|e| panic!("client: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "client failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for line in stdout.lines() {
            let mut words = line.splitn(3, ' ');
            let (Some(word), Some(name)) = (words.next(), words.next()) else {
                panic!("unexpected client line {line:?}");
            };
            seen.insert(
                name.to_owned(),
                (word.to_owned(), words.next().unwrap_or_default().to_owned()),
            );
        }
    }
    let mut words: BTreeMap<&str, usize> = BTreeMap::new();
    for (word, _) in seen.values() {
        *words.entry(word.as_str()).or_default() += 1;
    }
    let sample: Vec<_> = seen
        .iter()
        .filter(|(_, (w, _))| w != "created")
        .take(3)
        .collect();
    eprintln!("clients: {words:?}; e.g. {sample:?}");
    seen
}

/// Every recorded file reads; the rows, each audit id once.
fn read_recordings(dir: &Path) -> Vec<RequestRecord> {
    let files = recorder::list_files(dir).unwrap_or_else(|e| panic!("list recordings: {e}"));
    assert!(!files.is_empty(), "no recording files in {}", dir.display());
    let mut rows = Vec::new();
    for file in &files {
        rows.extend(
            recorder::read_file(file)
                .unwrap_or_else(|e| panic!("a recorded file does not read: {e}")),
        );
    }
    let mut ids = BTreeSet::new();
    for row in &rows {
        assert!(
            ids.insert(row.audit_id.clone()),
            "audit id {} recorded twice",
            row.audit_id
        );
    }
    rows
}

/// The name a `create` row's request object carries.
fn created_name(row: &RequestRecord) -> Option<String> {
    let object: serde_json::Value = serde_json::from_str(row.request_object.as_deref()?).ok()?;
    object["metadata"]["name"].as_str().map(str::to_owned)
}

struct Tally {
    stored: BTreeSet<String>,
    rows: BTreeMap<String, Outcome>,
    unknown: usize,
    client_created: usize,
}

/// The property: no applied mutation without a row, nothing a client saw created missing,
/// and no row claiming a forward the API server never saw answered with 201.
fn check_no_loss(setup: &Setup, seen: &BTreeMap<String, (String, String)>) -> Tally {
    let rows = read_recordings(&setup.recordings);
    let mut by_name: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut created_201 = BTreeSet::new();
    for row in &rows {
        if row.verb != Verb::Create || row.object_ref.resource != "configmaps" {
            continue;
        }
        let Some(name) = created_name(row) else {
            panic!("a create row without its object: {row:?}");
        };
        if row.outcome == Outcome::Forwarded && row.response_code == 201 {
            created_201.insert(name.clone());
        }
        if matches!(row.outcome, Outcome::Forwarded | Outcome::Unknown) {
            by_name.insert(name, row.outcome);
        } else {
            by_name.entry(name).or_insert(row.outcome);
        }
    }
    let stored: BTreeSet<String> = seen
        .keys()
        .filter(|name| {
            setup
                .apiserver
                .object("configmaps", "default", name)
                .is_some()
        })
        .cloned()
        .collect();
    let unrecorded: Vec<&String> = stored
        .iter()
        .filter(|name| {
            !matches!(
                by_name.get(*name),
                Some(Outcome::Forwarded | Outcome::Unknown)
            )
        })
        .collect();
    assert!(
        unrecorded.is_empty(),
        "{} of {} stored ConfigMaps have no forwarded/unknown create row: {:?}",
        unrecorded.len(),
        stored.len(),
        &unrecorded[..unrecorded.len().min(10)]
    );
    let phantom: Vec<&String> = created_201.difference(&stored).collect();
    assert!(
        phantom.is_empty(),
        "rows say created (201) but the API server has no such ConfigMap: {phantom:?}"
    );
    let client_created: Vec<&String> = seen
        .iter()
        .filter(|(_, (word, _))| word == "created")
        .map(|(name, _)| name)
        .collect();
    let missing: Vec<&&String> = client_created
        .iter()
        .filter(|n| !stored.contains(**n))
        .collect();
    assert!(
        missing.is_empty(),
        "clients saw these created but they are not stored: {missing:?}"
    );
    let unknown = by_name.values().filter(|o| **o == Outcome::Unknown).count();
    let forwarded_or_unknown = by_name
        .values()
        .filter(|o| matches!(o, Outcome::Forwarded | Outcome::Unknown))
        .count();
    let unknown_not_applied = forwarded_or_unknown - stored.len();
    // Only a request in flight at a kill can be `unknown` without having been applied.
    assert!(
        unknown_not_applied <= unknown,
        "{unknown_not_applied} forwarded/unknown rows without an object, more than the {unknown} unknown ones"
    );
    eprintln!(
        "stored {}, create rows forwarded-or-unknown {forwarded_or_unknown} ({unknown} unknown, {unknown_not_applied} of them never applied), clients saw {} created",
        stored.len(),
        client_created.len()
    );
    Tally {
        stored,
        rows: by_name,
        unknown,
        client_created: client_created.len(),
    }
}

fn wal_segments(recordings: &Path) -> usize {
    std::fs::read_dir(recordings.join(recorder::DEFAULT_WAL_DIR))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("wal-"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits until the API server has seen `n` more ConfigMap creates than `since` (the
/// clients have started and are busy), returning the count now.
async fn wait_for_creates(apiserver: &TestApiServer, since: usize, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let creates = apiserver
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path_and_query.contains("/configmaps"))
            .count();
        if creates >= since + n {
            return creates;
        }
        assert!(
            Instant::now() < deadline,
            "the clients made only {} creates in a minute",
            creates - since
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One load test at a time: they share two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A small, varying pause (no RNG crate: the clock's nanoseconds are random enough).
fn random_pause(min_ms: u64, spread_ms: u64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Duration::from_millis(min_ms + u64::from(nanos) % spread_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_leaves_no_applied_mutation_without_a_row() {
    let _serial = SERIAL.lock().await;
    let setup = setup(None).await;
    let stop = setup.dir.path().join("stop");
    let mut gateway = start_gateway(&setup).await;
    let clients = start_clients(&setup, &stop);
    const KILLS: usize = 5;
    let mut creates = 0;
    for _ in 0..KILLS {
        // Kill only under load: after the clients got a few creates through this gateway.
        creates = wait_for_creates(&setup.apiserver, creates, 20).await;
        tokio::time::sleep(random_pause(200, 1000)).await;
        kill9(gateway).await;
        tokio::time::sleep(random_pause(50, 200)).await;
        gateway = start_gateway(&setup).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let seen = stop_clients(&stop, clients).await;
    stop_gracefully(&setup, gateway).await;
    let tally = check_no_loss(&setup, &seen);
    assert!(
        tally.client_created > 100,
        "the clients created too little to test anything: {}",
        tally.client_created
    );
    assert_eq!(
        wal_segments(&setup.recordings),
        0,
        "a clean shutdown leaves no write-ahead log behind"
    );
    // Every file the killed gateways published is listed in the manifest and intact.
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .arg("verify")
        .arg(&setup.recordings)
        .output()
        .unwrap_or_else(|e| panic!("chaperone verify: {e}"));
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && out.contains("signatures NOT checked"),
        "chaperone verify after the kills: {out}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    eprintln!(
        "{KILLS} kills: {} attempts, {} stored, {} rows tracked, {} unknown",
        seen.len(),
        tally.stored.len(),
        tally.rows.len(),
        tally.unknown
    );
}

/// Unmounts the tmpfs when the test ends, even by a panic.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir: {e}"));
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(status.success(), "mount tmpfs on {}", path.display());
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Fills the file system holding `path` with one file, to the last byte it takes.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap_or_else(|e| panic!("filler: {e}"));
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        if file.write_all(&chunk).is_err() {
            break;
        }
    }
    let small = [0u8; 512];
    while file.write_all(&small).is_ok() {}
    let _ = file.sync_all();
}

async fn wait_ready(admin: SocketAddr, want: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some((code, body)) = admin_get(admin, "/readyz").await
            && code == want
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not answer {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_recording_disk_refuses_mutations_with_503_and_loses_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the disk-full test as root"
        );
        return;
    }
    let _serial = SERIAL.lock().await;
    let mount_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let disk = mount_dir.path().join("disk");
    let _tmpfs = Tmpfs::mount(&disk, "24m");
    let setup = setup(Some(disk.join("recordings"))).await;
    let stop = setup.dir.path().join("stop");
    let gateway = start_gateway(&setup).await;
    wait_ready(setup.admin, 200, Duration::from_secs(5)).await;
    let clients = start_clients(&setup, &stop);
    wait_for_creates(&setup.apiserver, 0, 40).await;

    let filler = disk.join("filler");
    fill(&filler);
    let why = wait_ready(setup.admin, 503, Duration::from_secs(10)).await;
    assert!(
        why.contains("No space left on device"),
        "/readyz should name the cause: {why}"
    );
    let metrics = admin_get(setup.admin, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        metrics.contains("recording_up 0"),
        "the metric should say recording is down"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("free the disk: {e}"));
    wait_ready(setup.admin, 200, Duration::from_secs(10)).await;
    // Counted from now: creates made before the disk filled do not show a recovery.
    let recovered_at = wait_for_creates(&setup.apiserver, 0, 0).await;
    wait_for_creates(&setup.apiserver, recovered_at, 40).await;
    let seen = stop_clients(&stop, clients).await;

    // Rows lost from Parquet while the disk was full are in the log: a kill and a restart
    // replay them.
    kill9(gateway).await;
    let gateway = start_gateway(&setup).await;
    stop_gracefully(&setup, gateway).await;

    let refused: Vec<&(String, String)> = seen
        .values()
        .filter(|(word, rest)| word == "failed" && rest.starts_with("503"))
        .collect();
    assert!(
        !refused.is_empty(),
        "clients should have seen 503s while the disk was full"
    );
    assert!(
        refused
            .iter()
            .any(|(_, rest)| rest.contains("write-ahead log")
                || rest.contains("recording is down")),
        "the 503 should say why: {:?}",
        refused.first()
    );
    let tally = check_no_loss(&setup, &seen);
    assert!(
        tally.client_created > 20,
        "too few creates to test anything: {}",
        tally.client_created
    );
    // Creates succeeded again after the disk was freed: some client created a ConfigMap
    // after its last 503.
    let index = |name: &str| {
        let (client, n) = name.rsplit_once('-')?;
        Some((client.to_owned(), n.parse::<u64>().ok()?))
    };
    let mut last_refused: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_created: BTreeMap<String, u64> = BTreeMap::new();
    for (name, (word, rest)) in &seen {
        let Some((client, n)) = index(name) else {
            continue;
        };
        if word == "failed" && rest.starts_with("503") {
            let last = last_refused.entry(client).or_insert(0);
            *last = (*last).max(n);
        } else if word == "created" {
            let last = last_created.entry(client).or_insert(0);
            *last = (*last).max(n);
        }
    }
    assert!(
        last_refused
            .iter()
            .any(|(client, refused)| last_created.get(client).is_some_and(|c| c > refused)),
        "no client created anything after its last 503: recording did not recover"
    );
    eprintln!(
        "disk full: {} refused with 503, {} stored",
        refused.len(),
        tally.stored.len()
    );
}

/// Starts moto's S3 server on a free port with `bucket` created; killed on drop.
async fn start_moto(bucket: &str) -> (Child, u16) {
    let tools = std::env::var_os("CHAPERONE_PYTOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/chaperone-pytools")
        });
    let port = free_port();
    let child = Command::new(tools.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start moto_server (cargo xtask setup installs it): {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut stream) = TcpStream::connect(addr).await {
            let request = format!(
                "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let mut response = Vec::new();
            if stream.write_all(request.as_bytes()).await.is_ok()
                && stream.read_to_end(&mut response).await.is_ok()
                && String::from_utf8_lossy(&response).contains(" 200 ")
            {
                return (child, port);
            }
        }
        assert!(Instant::now() < deadline, "moto_server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The daemon ships what it records: with `recording.upload`, files and the manifest
/// reach the S3-compatible server (the last ones on shutdown), the metrics count them,
/// and `chaperone verify s3://...` passes on the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_uploads_files_and_manifests_and_the_copy_verifies() {
    let _serial = SERIAL.lock().await;
    let (_moto, port) = start_moto("evidence").await;
    let creds = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let id_file = creds.path().join("id");
    let secret_file = creds.path().join("secret");
    write(&id_file, "testing\n");
    write(&secret_file, "testing\n");
    let setup = setup_with(None, |config| {
        config.recording.upload = Some(gateway_userspace::config::UploadConfig {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            bucket: "evidence".into(),
            prefix: "cluster-a".into(),
            region: "us-east-1".into(),
            access_key_id_file: Some(id_file.clone()),
            secret_access_key_file: Some(secret_file.clone()),
            ca_file: None,
            every: Duration::from_millis(300),
            max_local_bytes: None,
        });
    })
    .await;
    let stop = setup.dir.path().join("stop");
    let gateway = start_gateway(&setup).await;
    let clients = start_clients(&setup, &stop);
    wait_for_creates(&setup.apiserver, 0, 30).await;
    // Files close every second and are shipped within a scan.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = admin_get(setup.admin, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        let uploaded = metrics
            .lines()
            .find_map(|l| l.strip_prefix("chaperone_recording_upload_files_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if uploaded >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing uploaded: {}",
            metrics
                .lines()
                .filter(|l| l.contains("upload"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _seen = stop_clients(&stop, clients).await;
    stop_gracefully(&setup, gateway).await;
    let local = std::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .arg("verify")
        .arg(&setup.recordings)
        .output()
        .unwrap_or_else(|e| panic!("chaperone verify: {e}"));
    let local_out = String::from_utf8_lossy(&local.stdout).into_owned();
    assert!(local.status.success(), "local verify: {local_out}");
    let remote = std::process::Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args(["verify", "s3://evidence/cluster-a", "--endpoint"])
        .arg(format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap_or_else(|e| panic!("chaperone verify s3: {e}"));
    let remote_out = String::from_utf8_lossy(&remote.stdout).into_owned();
    assert!(
        remote.status.success(),
        "verify of the copy: {remote_out}{}",
        String::from_utf8_lossy(&remote.stderr)
    );
    // The copy holds everything the node listed, the files closed at shutdown included.
    let summary = |out: &str| {
        out.lines()
            .find(|l| l.contains(" manifests, "))
            .and_then(|l| l.split_once(": "))
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or_default()
    };
    assert_eq!(summary(&remote_out), summary(&local_out));
}
