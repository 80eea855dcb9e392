//! A gateway without the kernel redirect (interception mode `none`) on 127.0.0.1: what the
//! in-process tests and the HTTP benchmark run, and what a workstation would use.

use std::{path::Path, time::Duration};

use gateway_userspace::config::{
    AdminConfig, Config, InterceptionConfig, InterceptionMode, ListenConfig, PolicyConfig,
    RecordingConfig, ServingTlsConfig, UpstreamConfig, default_server_names,
};

/// File names [`local_config`] expects in its directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA's private key.
pub const CA_KEY: &str = "ca.key";
/// The gateway's token.
pub const TOKEN: &str = "token";

/// A config for a gateway on `127.0.0.1:0` (admin too) in front of `upstream_url`, with the
/// CA (`ca.crt`, `ca.key`) and token (`token`) read from `dir`, recordings in
/// `dir/recordings`, no policy and default limits. Callers adjust fields from there.
pub fn local_config(dir: &Path, upstream_url: &str) -> Result<Config, url::ParseError> {
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    Ok(Config {
        node: Some("test-node".to_owned()),
        cluster: "test".to_owned(),
        listen: ListenConfig {
            address: loopback,
            workers: 0,
        },
        interception: InterceptionConfig {
            mode: InterceptionMode::None,
            ..InterceptionConfig::default()
        },
        upstream: UpstreamConfig {
            url: Some(upstream_url.parse()?),
            ca_file: Some(dir.join(CA_CERT)),
            kubeconfig: None,
            in_cluster: false,
            protocol: Default::default(),
            token_file: Some(dir.join(TOKEN)),
            client_cert_file: None,
            client_key_file: None,
            tls_server_name: None,
            impersonate: Default::default(),
            connect_timeout: Duration::from_secs(2),
        },
        tls: ServingTlsConfig {
            ca_cert_file: dir.join(CA_CERT),
            ca_key_file: dir.join(CA_KEY),
            server_names: default_server_names(),
            server_ips: vec![loopback.ip()],
            create_ca_if_missing: false,
        },
        identity: Default::default(),
        policy: Some(PolicyConfig::AllowAll),
        recording: RecordingConfig {
            dir: dir.join("recordings"),
            max_rows_per_file: 1000,
            max_file_age: Duration::from_secs(60),
            max_object_bytes: 256 * 1024,
            response_bodies: true,
            reads_while_down: Default::default(),
            wal_dir: None,
            signing_key_file: None,
            upload: None,
            max_session_bytes: gateway_userspace::recorder::DEFAULT_MAX_SESSION_BYTES,
        },
        admin: AdminConfig { address: loopback },
        shutdown_grace: Duration::from_secs(5),
        limits: Default::default(),
        approval: None,
    })
}

/// The gateway's view of `apiserver` with `token`: its CA and the token written into `dir`
/// (`ca.crt`, `token`), ready for `kube::Client::try_from(upstream.config)`.
pub fn upstream_for(
    apiserver: &crate::apiserver::TestApiServer,
    dir: &Path,
    token: &str,
) -> Result<gateway_userspace::upstream::Upstream, String> {
    std::fs::write(dir.join(CA_CERT), apiserver.ca_pem()).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(TOKEN), token).map_err(|e| e.to_string())?;
    let url: url::Url = apiserver.url().parse().map_err(|e| format!("{e}"))?;
    gateway_userspace::upstream::Upstream::from_settings(gateway_userspace::upstream::Settings {
        url: &url,
        ca_file: &dir.join(CA_CERT),
        token_file: Some(&dir.join(TOKEN)),
        client_certificate: None,
        tls_server_name: None,
    })
    .map_err(|e| e.to_string())
}

/// `GET path` on a gateway's admin endpoint (plain HTTP/1.1): the status code and body, or
/// `None` when it does not answer within a few seconds (not up, or gone).
pub async fn admin_get(admin: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(admin),
    )
    .await
    .ok()?
    .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}
