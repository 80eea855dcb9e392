//! The `chaperone` binary's contract: exit codes (0 ok, 1 failure, 2 usage error) and
//! errors that name the file, line and field at fault. Also checks that the shipped
//! example policy and config parse.

use std::process::{Command, Output};

fn chaperone(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chaperone"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap_or_else(|e| panic!("run chaperone {args:?}: {e}"))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_example_policy_checks_clean() {
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/policy.yaml");
    let out = chaperone(&["check", "--policy", policy]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let rules = include_str!("../../deploy/config/policy.yaml")
        .lines()
        .filter(|l| l.trim_start().starts_with("- name: "))
        .count();
    assert!(stdout.contains(&format!("ok ({rules} rules)")), "{stdout}");
}

#[test]
fn a_bad_policy_fails_with_file_line_and_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: r\n    action: deny\n    verbs: [remove]\n    resources: [pods]\n",
    )
    .expect("write policy");
    let out = chaperone(&["check", "--policy", path.to_str().expect("utf-8 path")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("policy.yaml:7:")
            && stderr.contains("rules[0].verbs[0]")
            && stderr.contains("remove"),
        "{stderr}"
    );
}

#[test]
fn check_reports_cel_errors_with_file_line_and_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.yaml");
    for (condition, want) in [
        ("object.spec.", "invalid CEL expression"),
        (
            "objekt.spec.hostNetwork == true",
            "unknown variable 'objekt'",
        ),
    ] {
        std::fs::write(
            &path,
            format!(
                "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: no-host-network\n    action: deny\n    verbs: [create]\n    resources: [pods]\n    when:\n      - '{condition}'\n"
            ),
        )
        .expect("write policy");
        let out = chaperone(&["check", "--policy", path.to_str().expect("utf-8 path")]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{condition}: {stdout}{stderr}");
        assert!(
            stderr.contains("policy.yaml:10:")
                && stderr.contains("rules[0].when[0]")
                && stderr.contains(want),
            "{condition}: {stderr}"
        );
    }
}

#[test]
fn a_bad_config_fails_naming_the_key_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("chaperone.yaml");
    std::fs::write(&path, "listen:\n  adress: 127.0.0.1:1\n").expect("write config");
    let out = chaperone(&["run", "--config", path.to_str().expect("utf-8 path")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("chaperone.yaml:") && stderr.contains("listen.adress"),
        "{stderr}"
    );

    let out = chaperone(&["run", "--config", "/nonexistent/chaperone.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("/nonexistent/chaperone.yaml"),
        "{:?}",
        text(&out)
    );

    for usage in [
        &["frobnicate"][..],
        &["run"],
        &["status", "--admin", "not-an-address"],
    ] {
        let out = chaperone(usage);
        assert_eq!(out.status.code(), Some(2), "{usage:?}: {:?}", text(&out));
    }
}

/// `check` loads the CA key the way `run` will: cluster formats pass, garbage is named.
#[test]
fn check_loads_the_ca_key_in_the_formats_clusters_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "ecparam",
        "-genkey",
        "-name",
        "prime256v1",
        "-noout",
        "-out",
        "ca.key",
    ]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=ca",
        "-days",
        "1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-out",
        "ca.crt",
    ]);
    std::fs::write(d.join("token"), "t").expect("token");
    let config = d.join("chaperone.yaml");
    let p = d.display();
    std::fs::write(
        &config,
        format!(
            "listen:\n  address: 127.0.0.1:15443\ninterception:\n  mode: none\n\
             upstream:\n  url: https://127.0.0.1:6443\n  caFile: {p}/ca.crt\n  tokenFile: {p}/token\n\
             tls:\n  caCertFile: {p}/ca.crt\n  caKeyFile: {p}/ca.key\n\
             recording:\n  dir: {p}/rec\npolicy: allowAll\n"
        ),
    )
    .expect("config");
    let out = chaperone(&["check", "--config", config.to_str().expect("utf-8 path")]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("policy: allowAll"), "{stdout}");

    std::fs::write(
        d.join("ca.key"),
        "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
    )
    .expect("break the key");
    let out = chaperone(&["check", "--config", config.to_str().expect("utf-8 path")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ca.key") && stderr.contains("SEC1 (BEGIN EC PRIVATE KEY"),
        "{stderr}"
    );
}

/// `check` loads the keys `run` would load at start: a manifest signing key that does
/// not load is found before a node's gateway fails on it.
#[test]
fn check_loads_the_signing_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("signing.pem"), "not a key").expect("signing key");
    let p = d.display();
    let config = check_config(
        d,
        &format!("  signingKeyFile: {p}/signing.pem\npolicy: allowAll\n"),
    );
    let out = chaperone(&["check", "--config", config.to_str().expect("utf-8 path")]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("recording.signingKeyFile") && stderr.contains("ed25519"),
        "{stderr}"
    );
    let out = chaperone(&["check"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing to check"), "{stderr}");
}

/// The released binary is the product alone: no demo, no test server.
#[test]
fn the_binary_ships_no_test_code() {
    let out = chaperone(&["--help"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for word in ["run", "check", "status", "uninstall"] {
        assert!(stdout.contains(word), "--help lacks {word}: {stdout}");
    }
    assert!(!stdout.contains("demo"), "--help lists test code: {stdout}");
    let out = chaperone(&["demo"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
}

#[test]
fn status_without_a_daemon_says_so() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let out = chaperone(&["status", "--admin", &format!("127.0.0.1:{port}")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is chaperone running?"), "{stderr}");
}

#[test]
fn policy_test_decides_fixtures_and_fails_on_a_denial() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/");
    let policy = format!("{root}policy.yaml");
    let fixtures = format!("{root}policy-tests.yaml");
    let out = chaperone(&["policy", "test", "--policy", &policy, &fixtures]);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the shipped fixtures pass:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("14 passed, 0 failed"), "{stdout}");
    assert!(
        stdout.contains("PASS  a privileged Deployment: deny")
            && stdout.contains(
                "rule \"no-privileged-workloads\": privileged containers are not allowed"
            ),
        "{stdout}"
    );

    // Without `expect`, a denial fails the run; a wrong expectation too; garbage is named.
    let dir = tempfile::tempdir().expect("tempdir");
    let denied = dir.path().join("denied.yaml");
    std::fs::write(
        &denied,
        "method: DELETE\npath: /api/v1/namespaces/kube-system\nworkload: {namespace: ai-agents, name: cursor-0}\n",
    )
    .expect("write fixture");
    let out = chaperone(&[
        "policy",
        "test",
        "--policy",
        &policy,
        denied.to_str().expect("utf-8"),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("FAIL  DELETE /api/v1/namespaces/kube-system: deny"),
        "{stdout}"
    );
    assert!(stdout.contains("no-destructive-deletes"), "{stdout}");
    let garbage = dir.path().join("garbage.yaml");
    std::fs::write(&garbage, "method: GET\npath: /api/v1/pods\nbogus: 1\n").expect("write fixture");
    let out = chaperone(&[
        "policy",
        "test",
        "--policy",
        &policy,
        garbage.to_str().expect("utf-8"),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("garbage.yaml") && stderr.contains("bogus"),
        "names the file and the key: {stderr}"
    );
}

/// `chaperone verify`: a clean signed tree passes (saying whether signatures were
/// checked), a wrong public key and a flipped byte fail with exit code 1 and name the
/// problem, bad input is a clear error.
#[test]
fn verify_checks_a_recording_tree_and_fails_on_tampering() {
    use ed25519_dalek::pkcs8::{
        EncodePrivateKey as _, EncodePublicKey as _, spki::der::pem::LineEnding,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let key_file = dir.path().join("signing.pem");
    std::fs::write(
        &key_file,
        key.to_pkcs8_pem(LineEnding::LF).expect("pem").as_bytes(),
    )
    .expect("write key");
    let public = dir.path().join("public.pem");
    std::fs::write(
        &public,
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem"),
    )
    .expect("write public key");
    let other = dir.path().join("other.pem");
    std::fs::write(
        &other,
        ed25519_dalek::SigningKey::from_bytes(&[3; 32])
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem"),
    )
    .expect("write other key");
    let recordings = dir.path().join("recordings");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (_trigger, watcher) = gateway_userspace::drain::channel();
        let cfg = gateway_userspace::recorder::RecorderConfig {
            signing_key_file: Some(key_file.clone()),
            ..gateway_userspace::recorder::RecorderConfig::new(&recordings, "node-1")
        };
        let (recorder, handle) =
            gateway_userspace::recorder::Recorder::start(cfg, watcher).expect("recorder");
        handle
            .record(gateway_userspace::recorder::RequestRecord {
                audit_id: "one".into(),
                node: "node-1".into(),
                ..Default::default()
            })
            .await
            .expect("record");
        drop(handle);
        recorder.join().await.expect("join");
    });
    let dir_arg = recordings.to_str().expect("utf-8 path");
    let out = chaperone(&["verify", dir_arg]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("signatures NOT checked"), "{stdout}");
    let out = chaperone(&[
        "verify",
        dir_arg,
        "--public-key",
        public.to_str().expect("utf-8"),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("1 signatures checked"), "{stdout}");
    let out = chaperone(&[
        "verify",
        dir_arg,
        "--public-key",
        other.to_str().expect("utf-8"),
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("signature does not verify"), "{stdout}");
    let file = gateway_userspace::recorder::list_files(&recordings).expect("list")[0].clone();
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[10] ^= 0xff;
    std::fs::write(&file, bytes).expect("write");
    let out = chaperone(&["verify", dir_arg]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL modified: table=requests/"),
        "{stdout}"
    );
    assert!(stderr.contains("problem(s) found"), "{stderr}");
    let out = chaperone(&[
        "verify",
        dir_arg,
        "--public-key",
        key_file.to_str().expect("utf-8"),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not an ed25519 public key"), "{stderr}");
}

/// `chaperone verify s3://BUCKET/PREFIX --endpoint ...` checks the copy in object storage
/// (moto's S3 server on loopback): clean passes, a planted object fails.
#[test]
fn verify_checks_the_copy_in_object_storage() {
    use gateway_userspace::recorder::upload::{self, UploadSettings, Uploader};
    let tools = std::env::var_os("CHAPERONE_PYTOOLS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/chaperone-pytools")
        });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut moto = Command::new(tools.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start moto_server (cargo xtask setup installs it)");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut moto);
    let put_bucket = || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(
            b"PUT /evidence HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out.contains(" 200 "))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while put_bucket() != Some(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "moto_server did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = UploadSettings {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        bucket: "evidence".into(),
        prefix: "prod".into(),
        region: "us-east-1".into(),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        every: std::time::Duration::from_secs(1),
        max_local_bytes: None,
        max_retries: 1,
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (_trigger, watcher) = gateway_userspace::drain::channel();
        let (recorder, handle) = gateway_userspace::recorder::Recorder::start(
            gateway_userspace::recorder::RecorderConfig::new(dir.path(), "node-1"),
            watcher,
        )
        .expect("recorder");
        handle
            .record(gateway_userspace::recorder::RequestRecord {
                audit_id: "one".into(),
                node: "node-1".into(),
                ..Default::default()
            })
            .await
            .expect("record");
        drop(handle);
        recorder.join().await.expect("join");
        let tls = upload::tls_for(None).expect("tls");
        let mut uploader = Uploader::new(dir.path(), settings.clone(), tls).expect("uploader");
        uploader.round().await.expect("upload");
    });
    let endpoint = format!("http://127.0.0.1:{port}");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_chaperone"))
            .args(["verify", "s3://evidence/prod", "--endpoint", &endpoint])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("RUST_LOG", "error")
            .output()
            .expect("run chaperone verify")
    };
    let out = run();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("1 manifests, 1 entries, 1 files hashed"),
        "{stdout}"
    );
    // A file planted in the bucket that no manifest lists.
    std::fs::create_dir_all(
        dir.path()
            .join("table=requests/date=2026-01-01/node=node-1"),
    )
    .expect("mkdir");
    std::fs::write(
        dir.path()
            .join("table=requests/date=2026-01-01/node=node-1/part-planted.parquet"),
        b"planted",
    )
    .expect("plant");
    runtime.block_on(async {
        let tls = upload::tls_for(None).expect("tls");
        let mut uploader = Uploader::new(dir.path(), settings, tls).expect("uploader");
        uploader.round().await.expect("upload");
    });
    let out = run();
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "FAIL unlisted: table=requests/date=2026-01-01/node=node-1/part-planted.parquet"
        ),
        "{stdout}"
    );
}

/// `check` finds approve rules a config cannot serve: without an `approval` section every
/// request they match would be refused.
#[test]
fn check_finds_approve_rules_without_an_approval_section() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(
        d.join("policy.yaml"),
        "apiVersion: chaperone.dev/v1alpha1\nkind: Policy\ndefault: allow\nrules:\n  - name: scale-needs-a-person\n    action: approve\n    verbs: [patch]\n    apiGroups: [apps]\n    resources: [deployments/scale]\n    approval:\n      approvers: {users: [alice]}\n",
    )
    .expect("policy");
    let p = d.display();
    let config = check_config(d, &format!("policy:\n  file: {p}/policy.yaml\n"));
    let out = chaperone(&["check", "--config", config.to_str().expect("utf-8 path")]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("scale-needs-a-person") && stderr.contains("no `approval` section"),
        "{stderr}"
    );
    // The policy alone is fine: which config serves it is not known.
    let policy = d.join("policy.yaml");
    let out = chaperone(&["check", "--policy", policy.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
}

/// A config for `check` in `d` (with a fresh CA and a token), `rest` appended after
/// `recording.dir`; returns its path.
fn check_config(d: &std::path::Path, rest: &str) -> std::path::PathBuf {
    let (ca, key) = gateway_userspace::tls::CertificateAuthority::generate("check-ca").expect("ca");
    std::fs::write(d.join("ca.crt"), ca.cert_pem()).expect("ca.crt");
    std::fs::write(d.join("ca.key"), key).expect("ca.key");
    std::fs::write(d.join("token"), "t").expect("token");
    let config = d.join("chaperone.yaml");
    let p = d.display();
    std::fs::write(
        &config,
        format!(
            "listen:\n  address: 127.0.0.1:15443\ninterception:\n  mode: none\n\
             upstream:\n  url: https://127.0.0.1:6443\n  caFile: {p}/ca.crt\n  tokenFile: {p}/token\n\
             tls:\n  caCertFile: {p}/ca.crt\n  caKeyFile: {p}/ca.key\n\
             recording:\n  dir: {p}/rec\n{rest}"
        ),
    )
    .expect("config");
    config
}
