//! Off the node: finished files and manifests reach a real S3-compatible server (moto's,
//! on loopback), the copy verifies, an unreachable server is a counted failure that loses
//! nothing (retention deletes only confirmed uploads), and uploading resumes by itself when
//! the server comes back on the same port. Also prints the upload throughput.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use gateway_userspace::{
    drain,
    recorder::{
        self, Recorder, RecorderConfig, RequestRecord, manifest,
        upload::{self, UploadSettings, Uploader},
    },
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
};

const BUCKET: &str = "chaperone-recordings";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("free port: {e}"))
}

/// A plain HTTP request to moto; the status code.
async fn http(addr: SocketAddr, method: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Starts moto's S3 server on `port` and creates the bucket.
async fn start_moto(port: u16) -> Child {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new(chaperone_e2e::python_tool("moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start moto_server (cargo xtask setup installs it): {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(code) = http(addr, "PUT", &format!("/{BUCKET}")).await {
            assert_eq!(code, 200, "create the bucket");
            return child;
        }
        assert!(Instant::now() < deadline, "moto_server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn settings(port: u16, max_local_bytes: Option<u64>) -> UploadSettings {
    UploadSettings {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        bucket: BUCKET.into(),
        prefix: "cluster-a".into(),
        region: "us-east-1".into(),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        every: Duration::from_millis(200),
        max_local_bytes,
        max_retries: 1,
    }
}

/// Records `files` files of a few rows each into `dir` as node `node-1`.
async fn record_files(dir: &Path, files: usize, first: usize) {
    let (_trigger, watcher) = drain::channel();
    let (recorder, handle) = Recorder::start(RecorderConfig::new(dir, "node-1"), watcher)
        .unwrap_or_else(|e| panic!("recorder: {e}"));
    for f in 0..files {
        for i in 0..3 {
            handle
                .record(RequestRecord {
                    audit_id: format!("row-{}-{i}", first + f),
                    node: "node-1".into(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("record: {e}"));
        }
        handle
            .flush()
            .await
            .unwrap_or_else(|e| panic!("flush: {e}"));
    }
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_reach_object_storage_and_survive_the_server_going_away() {
    let port = free_port();
    let mut moto = start_moto(port).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    record_files(dir.path(), 2, 0).await;
    let tls = upload::tls_for(None).unwrap_or_else(|e| panic!("tls: {e}"));
    let mut uploader = Uploader::new(dir.path(), settings(port, Some(0)), tls.clone())
        .unwrap_or_else(|e| panic!("uploader: {e}"));
    let stats = uploader.stats();
    uploader
        .round()
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    assert_eq!(
        stats.uploaded.load(Ordering::Relaxed),
        3,
        "2 files and the manifest"
    );

    // The copy in object storage verifies like the local tree.
    let remote = upload::read_remote_tree(&settings(port, None), tls.clone())
        .await
        .unwrap_or_else(|e| panic!("read the copy: {e}"));
    let report = manifest::verify_tree(&remote, None);
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!((report.entries, report.files), (2, 2));

    // Retention (limit 0) deleted both local files: their upload was confirmed.
    assert_eq!(
        recorder::list_files(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        0
    );

    // The server goes away: a new file waits, counted, and is not deleted.
    moto.start_kill()
        .unwrap_or_else(|e| panic!("kill moto: {e}"));
    let _ = moto.wait().await;
    record_files(dir.path(), 1, 10).await;
    let error = uploader
        .round()
        .await
        .err()
        .unwrap_or_else(|| panic!("an upload to a dead server must fail"));
    assert!(error.contains("upload "), "{error}");
    assert_eq!(
        stats.failures.load(Ordering::Relaxed),
        0,
        "round() leaves counting to run()"
    );
    assert!(stats.pending.load(Ordering::Relaxed) >= 1);
    let waiting = recorder::list_files(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(waiting.len(), 1, "an unconfirmed file is never deleted");

    // Back on the same port (moto keeps nothing: the bucket is made again).
    let _moto = start_moto(port).await;
    let (trigger, watcher) = drain::channel();
    let task = tokio::spawn(uploader.run(watcher));
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.pending.load(Ordering::Relaxed) > 0 || stats.uploaded.load(Ordering::Relaxed) < 5 {
        assert!(
            Instant::now() < deadline,
            "uploading did not resume: {} uploaded, {} pending",
            stats.uploaded.load(Ordering::Relaxed),
            stats.pending.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(trigger);
    task.await.unwrap_or_else(|e| panic!("uploader task: {e}"));
    let remote = upload::read_remote_tree(&settings(port, None), tls)
        .await
        .unwrap_or_else(|e| panic!("read the copy: {e}"));
    let name = waiting[0]
        .strip_prefix(dir.path())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert!(
        remote.files.contains_key(&name),
        "{name} should be uploaded after the server came back: {:?}",
        remote.files.keys()
    );
    assert_eq!(remote.manifests.len(), 1, "the manifest is uploaded again");
}

/// A published file never changes: one modified on the node after its upload is not
/// uploaded over the copy in object storage, which stays the evidence.
#[tokio::test]
async fn a_file_changed_after_its_upload_is_not_uploaded_over_the_copy() {
    let port = free_port();
    let _moto = start_moto(port).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    record_files(dir.path(), 1, 0).await;
    let tls = upload::tls_for(None).unwrap_or_else(|e| panic!("tls: {e}"));
    let mut uploader = Uploader::new(dir.path(), settings(port, None), tls.clone())
        .unwrap_or_else(|e| panic!("uploader: {e}"));
    uploader
        .round()
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    let file = recorder::list_files(dir.path()).unwrap_or_else(|e| panic!("{e}"))[0].clone();
    let uploaded = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let mut bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("read: {e}"));
    bytes.extend_from_slice(b"forged rows");
    std::fs::write(&file, &bytes).unwrap_or_else(|e| panic!("tamper: {e}"));
    let error = uploader
        .round()
        .await
        .err()
        .unwrap_or_else(|| panic!("a changed file must fail the round"));
    assert!(error.contains("changed after its upload"), "{error}");
    // A new uploader (a restart) finds the copy and keeps it too.
    let mut restarted = Uploader::new(dir.path(), settings(port, None), tls.clone())
        .unwrap_or_else(|e| panic!("uploader: {e}"));
    let error = restarted
        .round()
        .await
        .err()
        .unwrap_or_else(|| panic!("a changed file must fail the round after a restart"));
    assert!(error.contains("not uploaded over it"), "{error}");
    let remote = upload::read_remote_tree(&settings(port, None), tls)
        .await
        .unwrap_or_else(|e| panic!("read the copy: {e}"));
    let name = file
        .strip_prefix(dir.path())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    assert_eq!(
        remote.files.get(&name).map(|(_, size)| *size),
        Some(uploaded),
        "the copy in object storage is the one uploaded"
    );
}

/// A restarted uploader finds its files and its manifest already in object storage and
/// sends none of them again (a node's closed manifest segments are never re-sent).
#[tokio::test]
async fn a_restarted_uploader_sends_nothing_already_there() {
    let port = free_port();
    let _moto = start_moto(port).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    record_files(dir.path(), 2, 0).await;
    let tls = upload::tls_for(None).unwrap_or_else(|e| panic!("tls: {e}"));
    let mut first = Uploader::new(dir.path(), settings(port, None), tls.clone())
        .unwrap_or_else(|e| panic!("uploader: {e}"));
    first
        .round()
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    assert_eq!(
        first.stats().uploaded.load(Ordering::Relaxed),
        3,
        "two files, a manifest"
    );
    let mut restarted = Uploader::new(dir.path(), settings(port, None), tls.clone())
        .unwrap_or_else(|e| panic!("uploader: {e}"));
    restarted
        .round()
        .await
        .unwrap_or_else(|e| panic!("upload after a restart: {e}"));
    assert_eq!(restarted.stats().uploaded.load(Ordering::Relaxed), 0);
    assert_eq!(restarted.stats().pending.load(Ordering::Relaxed), 0);
    // A new file: it and the manifest that now lists it go up, nothing else.
    record_files(dir.path(), 1, 2).await;
    restarted
        .round()
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    assert_eq!(restarted.stats().uploaded.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_throughput() {
    let port = free_port();
    let _moto = start_moto(port).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let part = dir
        .path()
        .join("table=requests/date=2026-12-03/node=node-1");
    std::fs::create_dir_all(&part).unwrap_or_else(|e| panic!("{e}"));
    const FILES: usize = 16;
    const SIZE: usize = 4 << 20;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for f in 0..FILES {
        let bytes: Vec<u8> = (0..SIZE)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        std::fs::write(part.join(format!("part-{f:04}.parquet")), bytes)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let tls = upload::tls_for(None).unwrap_or_else(|e| panic!("tls: {e}"));
    let mut uploader = Uploader::new(dir.path(), settings(port, None), tls)
        .unwrap_or_else(|e| panic!("uploader: {e}"));
    let started = Instant::now();
    uploader
        .round()
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    let seconds = started.elapsed().as_secs_f64();
    let mib = (FILES * SIZE) as f64 / f64::from(1 << 20);
    assert_eq!(
        uploader.stats().uploaded.load(Ordering::Relaxed),
        FILES as u64
    );
    eprintln!(
        "upload throughput to moto on loopback: {mib:.0} MiB in {seconds:.2} s = {:.1} MiB/s",
        mib / seconds
    );
}
