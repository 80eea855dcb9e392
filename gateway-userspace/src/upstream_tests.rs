//! The kubeconfig adapter's observable behaviour: what kube-rs resolves, what the gateway
//! refuses on top, and that every error names the file and the context.

use std::{path::PathBuf, sync::Arc};

use base64::Engine as _;
use rustls_pki_types::{CertificateDer, pem::PemObject as _};

use super::*;
use crate::tls::CertificateAuthority;

const SERVER: &str = "https://127.0.0.1:6443";

struct Fixture {
    dir: tempfile::TempDir,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A directory with a real CA, a client certificate and key, and token files.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("create temp dir");
    let (ca, _) = CertificateAuthority::generate("upstream-test-ca").expect("CA");
    let (cert_pem, key_pem) = client_certificate();
    let ca_pem = ca.cert_pem().to_owned();
    let files: [(&str, &str); 8] = [
        ("certs/client.crt", &cert_pem),
        ("certs/client.key", &key_pem),
        ("ca.crt", &ca_pem),
        ("not-a-ca.crt", "just text\n"),
        ("secrets/token", "file-token"),
        ("secrets/empty", ""),
        ("secrets/newline", "file-token\n"),
        ("secrets/two-words", "two words"),
    ];
    for (name, content) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create fixture dir");
        std::fs::write(&path, content).expect("write fixture file");
    }
    std::fs::create_dir_all(dir.path().join("a-directory")).expect("dir");
    Fixture {
        dir,
        ca_pem,
        cert_pem,
        key_pem,
    }
}

/// A self-signed client certificate (clientAuth) and its key, as PEM.
fn client_certificate() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["chaperone-gateway".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "chaperone-gateway");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).expect("self-signed");
    (cert.pem(), key.serialize_pem())
}

/// One cluster `prod`, one user `admin`, context `main` selecting them.
fn config(cluster: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\npreferences: {{}}\n\
         current-context: main\n\
         clusters:\n- name: prod\n  cluster: {{{cluster}}}\n\
         users:\n- name: admin\n  user: {{{user}}}\n\
         contexts:\n- name: main\n  context: {{cluster: prod, user: admin, namespace: default}}\n"
    )
}

fn write(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("create kubeconfig dir");
    std::fs::write(&path, yaml).expect("write kubeconfig");
    path
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}

#[test]
fn resolves_supported_configs() {
    let f = fixture();
    let d = f.dir.path();
    let ca = format!("server: {SERVER}, certificate-authority: ca.crt");
    let two_contexts = format!(
        "current-context: main\n\
         clusters:\n\
         - name: prod\n  cluster: {{{ca}}}\n\
         - name: staging\n  cluster: {{server: 'https://[::1]:7443/prefix', tls-server-name: kubernetes.default.svc, certificate-authority-data: {}}}\n\
         users:\n\
         - name: robot\n  user: {{tokenFile: secrets/token}}\n\
         - name: laptop\n  user: {{exec: {{command: gke-gcloud-auth-plugin, apiVersion: client.authentication.k8s.io/v1}}}}\n\
         contexts:\n\
         - name: main\n  context: {{cluster: prod, user: laptop}}\n\
         - name: ci\n  context: {{cluster: staging, user: robot}}\n",
        b64(&f.ca_pem)
    );
    let token_path = d.join("secrets/token").display().to_string();
    // (case, kubeconfig, context, server, tls-server-name, credential kind, token file)
    type Case<'a> = (
        &'a str,
        String,
        Option<&'a str>,
        &'a str,
        Option<&'a str>,
        &'a str,
        Option<String>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "inline token, CA via data, tls-server-name",
            config(
                &format!(
                    "server: {SERVER}, certificate-authority-data: {}, tls-server-name: api.internal",
                    b64(&f.ca_pem)
                ),
                "token: abc.def-123_~+/=",
            ),
            None,
            SERVER,
            Some("api.internal"),
            "token",
            None,
        ),
        (
            "tokenFile relative to the kubeconfig, CA via relative path",
            config(&ca, "tokenFile: secrets/token"),
            None,
            SERVER,
            None,
            "tokenFile",
            Some(token_path.clone()),
        ),
        (
            "client certificate via data",
            config(
                &ca,
                &format!(
                    "client-certificate-data: {}, client-key-data: {}",
                    b64(&f.cert_pem),
                    b64(&f.key_pem)
                ),
            ),
            None,
            SERVER,
            None,
            "client certificate",
            None,
        ),
        (
            "client certificate via relative paths",
            config(
                &ca,
                "client-certificate: certs/client.crt, client-key: certs/client.key",
            ),
            None,
            SERVER,
            None,
            "client certificate",
            None,
        ),
        (
            "tokenFile and client certificate together",
            config(
                &ca,
                "tokenFile: secrets/token, client-certificate: certs/client.crt, client-key: certs/client.key",
            ),
            None,
            SERVER,
            None,
            "tokenFile and client certificate",
            Some(token_path.clone()),
        ),
        (
            "an exec plugin (run when the gateway starts, not when the config loads)",
            config(
                &ca,
                "exec: {command: /nonexistent/plugin, apiVersion: client.authentication.k8s.io/v1}",
            ),
            None,
            SERVER,
            None,
            "exec plugin",
            None,
        ),
        (
            "token and tokenFile: the token wins, as in client-go",
            config(&ca, "token: t, tokenFile: secrets/token"),
            None,
            SERVER,
            None,
            "token",
            Some(token_path.clone()),
        ),
        (
            "empty and null values count as absent",
            config(
                &format!("{ca}, insecure-skip-tls-verify: false, proxy-url: ''"),
                "token: t, exec: null, username: '', as-groups: [], as-user-extra: {}",
            ),
            None,
            SERVER,
            None,
            "token",
            None,
        ),
        (
            "unknown keys are tolerated (and logged)",
            config(
                &format!("{ca}, disable-compression: true, future-key: 1"),
                "token: t, extensions: [], token-typo: x",
            ),
            None,
            SERVER,
            None,
            "token",
            None,
        ),
        (
            "explicit context overrides current-context; other users' exec is not run",
            two_contexts,
            Some("ci"),
            "https://[::1]:7443/prefix",
            Some("kubernetes.default.svc"),
            "tokenFile",
            Some(token_path.clone()),
        ),
        (
            "a context without a user: anonymous (the config check then asks for a credential)",
            format!(
                "current-context: c\nclusters: [{{name: k, cluster: {{{ca}}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: k}}}}]\n"
            ),
            None,
            SERVER,
            None,
            "none",
            None,
        ),
    ];
    for (i, (name, yaml, context, server, tls_name, kind, token_file)) in
        cases.into_iter().enumerate()
    {
        let path = write(d, &format!("case-{i}.yaml"), &yaml);
        let got =
            Upstream::from_kubeconfig(&path, context).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want_context = context.unwrap_or(if name.starts_with("a context") {
            "c"
        } else {
            "main"
        });
        assert_eq!(
            got.source,
            format!("kubeconfig {} (context '{want_context}')", path.display()),
            "{name}"
        );
        assert_eq!(
            got.config.cluster_url,
            server.parse::<http::Uri>().expect("uri"),
            "{name}: server"
        );
        assert_eq!(
            got.config.root_cert,
            Some(vec![der(&f.ca_pem)]),
            "{name}: CA"
        );
        assert_eq!(
            got.config.tls_server_name.as_deref(),
            tls_name,
            "{name}: tls-server-name"
        );
        assert!(!got.config.accept_invalid_certs, "{name}");
        assert_eq!(got.credential_kind(), kind, "{name}: credential");
        assert_eq!(
            got.config.auth_info.token_file, token_file,
            "{name}: token file"
        );
        assert_eq!(got.config.proxy_url, None, "{name}: proxy");
    }
}

#[test]
fn relative_paths_follow_the_kubeconfig_directory() {
    let f = fixture();
    let path = write(
        f.dir.path(),
        "nested/deeper/config",
        &config(
            &format!("server: {SERVER}, certificate-authority: ../../ca.crt"),
            "tokenFile: ../../secrets/token",
        ),
    );
    let got = Upstream::from_kubeconfig(&path, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.config.root_cert, Some(vec![der(&f.ca_pem)]));
    let token = got.config.auth_info.token_file.expect("token file");
    assert!(Path::new(&token).is_absolute(), "{token}");
    assert_eq!(
        std::fs::read_to_string(&token).expect("read the resolved token file"),
        "file-token"
    );
}

#[test]
fn refuses_unsupported_or_broken_configs() {
    let f = fixture();
    let d = f.dir.path();
    let ok = format!("server: {SERVER}, certificate-authority: ca.crt");
    let user = |u: &str| config(&ok, u);
    let cluster = |c: &str| config(c, "token: t");
    let contexts = |current: &str, ctx: &str| {
        format!(
            "current-context: {current}\n\
             clusters: [{{name: prod, cluster: {{{ok}}}}}]\n\
             users: [{{name: admin, user: {{token: t}}}}]\n\
             contexts: [{ctx}]\n"
        )
    };
    // (case, kubeconfig, explicit context, context the error must name, words it must contain)
    type Case<'a> = (&'a str, String, Option<&'a str>, Option<&'a str>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "auth-provider",
            user("auth-provider: {name: oidc, config: {}}"),
            None,
            Some("main"),
            "user 'admin': auth-provider plugins are not supported",
        ),
        (
            "username",
            user("username: admin"),
            None,
            Some("main"),
            "user 'admin': basic authentication",
        ),
        (
            "password",
            user("password: hunter2"),
            None,
            Some("main"),
            "basic authentication",
        ),
        (
            "as",
            user("token: t, as: bob"),
            None,
            Some("main"),
            "impersonation",
        ),
        (
            "as-uid",
            user("token: t, as-uid: '1'"),
            None,
            Some("main"),
            "impersonation",
        ),
        (
            "as-groups",
            user("token: t, as-groups: [admins]"),
            None,
            Some("main"),
            "impersonation",
        ),
        (
            "as-user-extra",
            user("token: t, as-user-extra: {team: [a]}"),
            None,
            Some("main"),
            "impersonation",
        ),
        (
            "insecure-skip-tls-verify",
            cluster(&format!("{ok}, insecure-skip-tls-verify: true")),
            None,
            Some("main"),
            "cluster 'prod': insecure-skip-tls-verify is not supported; the gateway never skips",
        ),
        (
            "proxy-url",
            cluster(&format!("{ok}, proxy-url: 'http://proxy:3128'")),
            None,
            Some("main"),
            "cluster 'prod': proxy-url is not supported",
        ),
        (
            "http server",
            cluster("server: 'http://127.0.0.1:8080', certificate-authority: ca.crt"),
            None,
            Some("main"),
            "not https",
        ),
        (
            "server without scheme",
            cluster("server: '127.0.0.1:6443', certificate-authority: ca.crt"),
            None,
            Some("main"),
            "not https",
        ),
        (
            "server with credentials",
            cluster("server: 'https://u:p@example.com', certificate-authority: ca.crt"),
            None,
            Some("main"),
            "credentials",
        ),
        (
            "server with query",
            cluster("server: 'https://example.com/?x=1', certificate-authority: ca.crt"),
            None,
            Some("main"),
            "query",
        ),
        (
            "no server",
            cluster("certificate-authority: ca.crt"),
            None,
            Some("main"),
            "cluster url is missing",
        ),
        (
            "no CA",
            cluster(&format!("server: {SERVER}")),
            None,
            Some("main"),
            "cluster 'prod' has no certificate-authority(-data)",
        ),
        (
            "bad tls-server-name",
            cluster(&format!("{ok}, tls-server-name: 'not a name'")),
            None,
            Some("main"),
            "'not a name' is not a DNS name",
        ),
        (
            "CA bad base64",
            cluster(&format!(
                "server: {SERVER}, certificate-authority-data: '-----BEGIN CERTIFICATE-----'"
            )),
            None,
            Some("main"),
            "base64",
        ),
        (
            "CA file missing",
            cluster(&format!(
                "server: {SERVER}, certificate-authority: missing-ca.crt"
            )),
            None,
            Some("main"),
            "missing-ca.crt",
        ),
        (
            "CA is a directory",
            cluster(&format!(
                "server: {SERVER}, certificate-authority: a-directory"
            )),
            None,
            Some("main"),
            "a-directory",
        ),
        (
            "CA file holds no certificate",
            cluster(&format!(
                "server: {SERVER}, certificate-authority: not-a-ca.crt"
            )),
            None,
            Some("main"),
            "holds no PEM certificate",
        ),
        (
            "named context missing",
            user("token: t"),
            Some("nope"),
            None,
            "no context named 'nope' (contexts: 'main')",
        ),
        (
            "current-context missing",
            contexts(
                "gone",
                "{name: main, context: {cluster: prod, user: admin}}",
            ),
            None,
            None,
            "no context named 'gone'",
        ),
        (
            "current-context unset",
            contexts("''", "{name: main, context: {cluster: prod, user: admin}}"),
            None,
            None,
            "current-context is not set",
        ),
        (
            "context names a missing cluster",
            contexts("main", "{name: main, context: {cluster: dev, user: admin}}"),
            None,
            Some("main"),
            "no cluster named 'dev' (clusters: 'prod')",
        ),
        (
            "context names a missing user",
            contexts("main", "{name: main, context: {cluster: prod, user: root}}"),
            None,
            Some("main"),
            "no user named 'root' (users: 'admin')",
        ),
        (
            "context without cluster",
            contexts("main", "{name: main, context: {user: admin}}"),
            None,
            None,
            "cluster",
        ),
        (
            "context without body",
            contexts("main", "{name: main}"),
            None,
            Some("main"),
            "no body",
        ),
        (
            "cluster without body",
            config(&ok, "token: t").replace(&format!("cluster: {{{ok}}}"), "cluster: null"),
            None,
            Some("main"),
            "cluster 'prod' has no body",
        ),
        (
            "duplicate context",
            contexts(
                "main",
                "{name: main, context: {cluster: prod, user: admin}}, {name: main, context: {cluster: prod}}",
            ),
            None,
            None,
            "contexts: duplicate name 'main'",
        ),
        (
            "entry without name",
            contexts("main", "{context: {cluster: prod, user: admin}}"),
            None,
            None,
            "name",
        ),
        (
            "wrong apiVersion",
            user("token: t").replace("apiVersion: v1", "apiVersion: v2"),
            None,
            None,
            "apiVersion 'v2' is not supported",
        ),
        (
            "wrong kind",
            user("token: t").replace("kind: Config", "kind: Pod"),
            None,
            None,
            "kind 'Pod' is not supported",
        ),
        (
            "yaml syntax error",
            "clusters: [\n".to_owned(),
            None,
            None,
            "failed to parse kubeconfig YAML",
        ),
        (
            "not a mapping",
            "- a\n".to_owned(),
            None,
            None,
            "failed to parse kubeconfig YAML",
        ),
        (
            "user body not a mapping",
            user("").replace("user: {}", "user: just-a-string"),
            None,
            None,
            "failed to parse kubeconfig YAML",
        ),
        (
            "empty file",
            "\n".to_owned(),
            None,
            None,
            "current-context is not set",
        ),
    ];
    for (i, (name, yaml, context, names_context, words)) in cases.into_iter().enumerate() {
        let path = write(d, &format!("bad-{i}.yaml"), &yaml);
        let err = match Upstream::from_kubeconfig(&path, context) {
            Ok(got) => panic!("{name}: loaded {got:?}, expected an error with {words:?}"),
            Err(e) => e,
        };
        assert_eq!(err.config_key(), "upstream.kubeconfig", "{name}");
        let err = err.to_string();
        let prefix = match names_context {
            Some(c) => format!("kubeconfig {} context '{c}': ", path.display()),
            None => format!("kubeconfig {}: ", path.display()),
        };
        assert!(
            err.starts_with(&prefix),
            "{name}: error should start with {prefix:?}: {err}"
        );
        assert!(
            err.contains(words),
            "{name}: error should contain {words:?}: {err}"
        );
    }
}

#[test]
fn names_an_unreadable_kubeconfig() {
    let f = fixture();
    let cases = [
        (f.dir.path().join("no-such-config"), "No such file"),
        (f.dir.path().join("a-directory"), "not a regular file"),
    ];
    for (path, words) in cases {
        let err = Upstream::from_kubeconfig(&path, None)
            .map(|_| ())
            .expect_err("must fail")
            .to_string();
        let prefix = format!("kubeconfig {}: ", path.display());
        assert!(err.starts_with(&prefix) && err.contains(words), "{err}");
    }
    // Not UTF-8; and a UTF-16 byte-order mark with an odd length, on which kube-rs 4.2
    // would panic.
    for (name, bytes, words) in [
        ("binary", &[0xc3, 0x28, 0x00][..], "UTF-8"),
        ("odd-utf16", &[0xff, 0xfe, 0x00][..], "UTF-16"),
    ] {
        let path = f.dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        let err = Upstream::from_kubeconfig(&path, None)
            .map(|_| ())
            .expect_err("must fail")
            .to_string();
        assert!(err.contains(words) && err.contains(name), "{err}");
    }
}

#[test]
fn debug_output_never_shows_secrets() {
    let f = fixture();
    let path = write(
        f.dir.path(),
        "config",
        &config(
            &format!("server: {SERVER}, certificate-authority: ca.crt"),
            &format!(
                "token: sekrit-token, client-certificate: certs/client.crt, client-key-data: {}",
                b64(&f.key_pem)
            ),
        ),
    );
    let got = Upstream::from_kubeconfig(&path, None).unwrap_or_else(|e| panic!("{e}"));
    let shown = format!("{got:?}");
    assert!(
        !shown.contains("sekrit") && !shown.contains("PRIVATE KEY") && !shown.contains("LS0t"),
        "{shown}"
    );
    assert!(
        shown.contains("token and client certificate") && shown.contains("127.0.0.1"),
        "{shown}"
    );
    // A malformed user entry must not be echoed by the parse error either.
    let bad = write(
        f.dir.path(),
        "bad",
        &config(
            &format!("server: {SERVER}, certificate-authority: ca.crt"),
            "token: [sekrit-token]",
        ),
    );
    let err = Upstream::from_kubeconfig(&bad, None)
        .map(|_| ())
        .expect_err("a token that is a list")
        .to_string();
    assert!(
        err.contains("failed to parse kubeconfig YAML") && !err.contains("sekrit"),
        "{err}"
    );
}

#[test]
fn explicit_settings_become_a_kube_config() {
    let f = fixture();
    let d = f.dir.path();
    let url: url::Url = SERVER.parse().expect("url");
    let got = Upstream::from_settings(Settings {
        url: &url,
        ca_file: &d.join("ca.crt"),
        token_file: Some(&d.join("secrets/token")),
        client_certificate: Some((&d.join("certs/client.crt"), &d.join("certs/client.key"))),
        tls_server_name: Some("kubernetes.default.svc"),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.config.root_cert, Some(vec![der(&f.ca_pem)]));
    // kube-rs re-reads the CA file on rotation, as it does in-cluster.
    assert_eq!(got.config.root_cert_file, Some(d.join("ca.crt")));
    assert_eq!(got.credential_kind(), "tokenFile and client certificate");
    assert_eq!(
        got.config.tls_server_name.as_deref(),
        Some("kubernetes.default.svc")
    );
    for (ca, words) in [
        (d.join("nope.crt"), "nope.crt: No such file"),
        (d.join("not-a-ca.crt"), "holds no PEM certificate"),
    ] {
        let err = Upstream::from_settings(Settings {
            url: &url,
            ca_file: &ca,
            token_file: None,
            client_certificate: None,
            tls_server_name: None,
        })
        .map(|_| ())
        .expect_err("bad CA");
        assert_eq!(err.config_key(), "upstream.caFile");
        assert!(err.to_string().contains(words), "{err}");
    }
}

#[test]
fn client_certificate_errors_name_the_source() {
    let f = fixture();
    let d = f.dir.path();
    let ok = format!("server: {SERVER}, certificate-authority: ca.crt");
    for (name, user, words) in [
        (
            "cert file missing",
            "client-certificate: certs/nope.crt, client-key: certs/client.key",
            "nope.crt",
        ),
        (
            "key file missing",
            "client-certificate: certs/client.crt, client-key: certs/nope.key",
            "nope.key",
        ),
        (
            "cert without key",
            "client-certificate: certs/client.crt",
            "client key",
        ),
        (
            "cert bad base64",
            "client-certificate-data: 'not base64!', client-key: certs/client.key",
            "base64",
        ),
    ] {
        let path = write(
            d,
            &format!("{}.yaml", name.replace(' ', "-")),
            &config(&ok, user),
        );
        let upstream =
            Upstream::from_kubeconfig(&path, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        let err = upstream
            .tls_client_config()
            .map(|_| ())
            .expect_err(name)
            .to_string();
        assert!(
            err.starts_with(&format!(
                "kubeconfig {} (context 'main'): TLS client:",
                path.display()
            )) && err.contains(words),
            "{name}: {err}"
        );
    }
}

/// The client certificate from the kubeconfig is presented on the TLS connection that
/// kube-rs's client config makes (the forwarding path and the upgrade dialer both use it).
#[tokio::test]
async fn the_client_certificate_is_presented_upstream() {
    let f = fixture();
    let d = f.dir.path();
    let (ca, ca_key) = CertificateAuthority::generate("server-ca").expect("CA");
    let _ = ca_key;
    std::fs::write(d.join("server-ca.crt"), ca.cert_pem()).expect("write CA");
    let (chain, key) = ca
        .issue_server_cert(
            &[],
            &["127.0.0.1".parse().expect("ip")],
            std::time::Duration::from_secs(3600),
        )
        .expect("server cert");
    let mut client_roots = rustls::RootCertStore::empty();
    client_roots
        .add(CertificateDer::from(der(&f.cert_pem)))
        .expect("client root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        crate::tls::provider(),
    )
    .build()
    .expect("client verifier");
    let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let accepted = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = acceptor.accept(tcp).await.expect("server handshake");
        tls.get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.to_vec()).collect::<Vec<_>>())
    });
    let path = write(
        d,
        "mtls",
        &config(
            &format!("server: 'https://127.0.0.1:{port}', certificate-authority: server-ca.crt"),
            "client-certificate: certs/client.crt, client-key: certs/client.key",
        ),
    );
    let upstream = Upstream::from_kubeconfig(&path, None).unwrap_or_else(|e| panic!("{e}"));
    let tls = upstream
        .tls_client_config()
        .unwrap_or_else(|e| panic!("{e}"));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("client handshake");
    let presented = accepted.await.expect("server task");
    assert_eq!(presented, Some(vec![der(&f.cert_pem)]));
}

/// A kubeconfig whose user is `user`, with a real CA, in the fixture directory.
fn credential_source(f: &Fixture, name: &str, user: &str) -> Upstream {
    let path = write(
        f.dir.path(),
        name,
        &config(
            &format!("server: {SERVER}, certificate-authority: ca.crt"),
            user,
        ),
    );
    Upstream::from_kubeconfig(&path, None).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn injected(credential: &crate::proxy::UpstreamCredential) -> Result<Option<String>, String> {
    let mut headers = http::HeaderMap::new();
    credential.apply(&mut headers).map_err(|e| e.to_string())?;
    Ok(headers
        .get(http::header::AUTHORIZATION)
        .map(|v| v.to_str().expect("ASCII").to_owned()))
}

#[tokio::test]
async fn credentials_come_from_kube_rs_and_bad_ones_are_named() {
    use crate::proxy::UpstreamCredential;
    let f = fixture();
    for (name, user, want) in [
        ("token", "token: inline-token", Some("Bearer inline-token")),
        (
            "token-file",
            "tokenFile: secrets/token",
            Some("Bearer file-token"),
        ),
        (
            "certificate",
            "client-certificate: certs/client.crt, client-key: certs/client.key",
            None,
        ),
    ] {
        let up = credential_source(&f, name, user);
        let c = UpstreamCredential::from_kube(&up.config, &up.source)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(injected(&c), Ok(want.map(str::to_owned)), "{name}");
        assert!(!format!("{c:?}").contains("token\""), "{c:?}");
    }
    for (name, user, words) in [
        ("missing-file", "tokenFile: secrets/nope", "secrets/nope"),
        (
            "empty-file",
            "tokenFile: secrets/empty",
            "the token is empty",
        ),
        (
            "newline",
            "tokenFile: secrets/newline",
            "without a trailing newline",
        ),
        ("two-words", "tokenFile: secrets/two-words", "whitespace"),
        ("inline-space", "token: 'two words'", "whitespace"),
        ("empty-exec", "exec: {}", "command must be specified"),
        (
            "exec-missing",
            "exec: {apiVersion: client.authentication.k8s.io/v1, command: /nonexistent/plugin}",
            "unable to run auth exec",
        ),
    ] {
        let up = credential_source(&f, name, user);
        let err = UpstreamCredential::from_kube(&up.config, &up.source)
            .await
            .map(|_| ())
            .expect_err(name)
            .to_string();
        assert!(
            err.starts_with(&up.source) && err.contains(words),
            "{name}: {err}"
        );
        assert!(
            !err.contains("two words"),
            "{name}: the token leaked: {err}"
        );
    }
}

/// Writes an exec plugin that prints `credential.json` from `dir`, or fails while `fail`
/// exists there.
fn exec_plugin(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let script = dir.join("plugin.sh");
    let d = dir.display();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e '{d}/fail' ]; then echo 'plugin is broken' >&2; exit 3; fi\n\
             echo run >> '{d}/runs'\ncat '{d}/credential.json'\n"
        ),
    )
    .expect("write plugin");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

/// An ExecCredential whose token expires `expires_in` from now.
fn exec_credential(dir: &Path, token: &str, expires_in: std::time::Duration) {
    let expiry =
        jiff::Timestamp::now() + jiff::SignedDuration::try_from(expires_in).expect("duration");
    std::fs::write(
        dir.join("credential.json"),
        format!(
            "{{\"apiVersion\": \"client.authentication.k8s.io/v1\", \"kind\": \"ExecCredential\", \
             \"status\": {{\"token\": \"{token}\", \"expirationTimestamp\": \"{}\"}}}}",
            expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
        ),
    )
    .expect("write credential");
}

#[tokio::test]
async fn an_exec_plugin_is_run_again_when_its_token_is_due_and_a_failure_fails_closed() {
    use crate::proxy::UpstreamCredential;
    let f = fixture();
    let d = f.dir.path();
    let plugin = exec_plugin(d);
    // kube-rs runs the plugin again once the token is within a minute of expiring: 30 s
    // means every time it is asked.
    exec_credential(d, "exec-token-1", std::time::Duration::from_secs(30));
    let up = credential_source(
        &f,
        "exec",
        &format!(
            "exec: {{apiVersion: client.authentication.k8s.io/v1, command: {}, interactiveMode: Never}}",
            plugin.display()
        ),
    );
    let c = UpstreamCredential::from_kube(&up.config, &up.source)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(injected(&c), Ok(Some("Bearer exec-token-1".to_owned())));
    exec_credential(d, "exec-token-2", std::time::Duration::from_secs(30));
    // The request path still reads the snapshot; the control-plane refresh asks kube-rs.
    assert_eq!(injected(&c), Ok(Some("Bearer exec-token-1".to_owned())));
    assert!(c.refresh().await, "the new token is published");
    assert_eq!(injected(&c), Ok(Some("Bearer exec-token-2".to_owned())));
    // The plugin now fails: requests are refused with the reason, never sent bare.
    std::fs::write(d.join("fail"), "").expect("break the plugin");
    assert!(c.refresh().await);
    let err = injected(&c).expect_err("fails closed");
    assert!(
        err.starts_with(&up.source)
            && err.contains("auth exec command")
            && err.contains("exit status: 3"),
        "{err}"
    );
    // And recovers when the plugin does.
    std::fs::remove_file(d.join("fail")).expect("fix the plugin");
    c.refresh().await;
    assert_eq!(injected(&c), Ok(Some("Bearer exec-token-2".to_owned())));

    // A token valid for an hour is cached by kube-rs: asking again does not run the plugin.
    exec_credential(d, "exec-token-3", std::time::Duration::from_secs(3600));
    c.refresh().await;
    assert_eq!(injected(&c), Ok(Some("Bearer exec-token-3".to_owned())));
    let runs = std::fs::read_to_string(d.join("runs"))
        .expect("runs")
        .lines()
        .count();
    for _ in 0..5 {
        c.refresh().await;
    }
    assert_eq!(
        std::fs::read_to_string(d.join("runs"))
            .expect("runs")
            .lines()
            .count(),
        runs,
        "kube-rs re-ran a plugin whose token is not due"
    );
}

/// kube-rs re-reads a token file once its copy is about a minute old (50 s to 60 s), not at
/// once: what the proxy test `rotated_gateway_token_is_used_without_restart` waits for.
#[tokio::test]
async fn a_rewritten_token_file_is_not_read_again_at_once() {
    use crate::proxy::UpstreamCredential;
    let f = fixture();
    let up = credential_source(&f, "token-file", "tokenFile: secrets/token");
    let c = UpstreamCredential::from_kube(&up.config, &up.source)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(f.dir.path().join("secrets/token"), "file-token-2").expect("rotate");
    assert!(!c.refresh().await, "kube-rs re-read the file at once");
    assert_eq!(injected(&c), Ok(Some("Bearer file-token".to_owned())));
}
