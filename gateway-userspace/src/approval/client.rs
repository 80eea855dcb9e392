//! The approver's side: `chaperone requests|approve|deny`, also run as the kubectl plugin
//! `kubectl chaperone ...` (a `kubectl-chaperone` link to the binary on `PATH`).
//!
//! The approver's credential comes from their kubeconfig through kube-rs, exactly as
//! kubectl would use it (a token, a token file, an exec plugin such as an OIDC login
//! helper), honouring `--kubeconfig`/`KUBECONFIG`, `--context` and `--token`. kube-rs's
//! client then talks to the approvals API instead of the API server: its address comes
//! from `--server`, `CHAPERONE_APPROVALS_SERVER`, or the kubeconfig cluster's extension
//! named `chaperone.dev/approvals` (`server`, `certificate-authority-data`,
//! `tls-server-name`); the CA from `--certificate-authority`, the extension, or else the
//! cluster's own CA (the gateway's CA is usually the cluster's).

use std::{collections::HashMap, io::Write as _, path::PathBuf};

use anyhow::{Context as _, anyhow};
use base64::Engine as _;
use clap::{Args, ValueEnum};
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::{
    api::{BASE_PATH, DecisionRequest},
    resource::AccessRequest,
};

/// The kubeconfig extension naming the approvals API.
pub const KUBECONFIG_EXTENSION: &str = "chaperone.dev/approvals";
/// The environment variable naming the approvals API.
pub const SERVER_ENV: &str = "CHAPERONE_APPROVALS_SERVER";

/// How to reach the approvals API, and as whom (the usual kubectl flags).
#[derive(Debug, Clone, Default, Args)]
pub struct Connection {
    /// The kubeconfig file (default: `$KUBECONFIG`, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// A bearer token to present instead of the kubeconfig user's credential.
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// The AccessRequests' namespace (the gateway's); the approvals API refuses another.
    #[arg(long, short = 'n', global = true)]
    pub namespace: Option<String>,
    /// The approvals API (`https://host:port`); default: `$CHAPERONE_APPROVALS_SERVER`, then
    /// the kubeconfig cluster's `chaperone.dev/approvals` extension.
    #[arg(long, global = true, env = SERVER_ENV)]
    pub server: Option<String>,
    /// A PEM CA bundle that verifies the approvals API.
    #[arg(long, global = true, env = "CHAPERONE_APPROVALS_CA")]
    pub certificate_authority: Option<PathBuf>,
    /// The name to verify the approvals API's certificate against.
    #[arg(long, global = true)]
    pub tls_server_name: Option<String>,
}

/// Output formats of `requests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The whole object(s) as JSON.
    Json,
    /// The whole object(s) as YAML.
    Yaml,
    /// The names only (`accessrequest.chaperone.dev/<name>`).
    Name,
}

fn extension_string(ext: &serde_json::Value, key: &str) -> Option<String> {
    ext.get(key)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl Connection {
    /// A kube-rs client whose requests go to the approvals API with the approver's
    /// credential.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = match &self.kubeconfig {
            Some(path) => Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?,
            None => Kubeconfig::read().context(
                "reading the kubeconfig ($KUBECONFIG or ~/.kube/config; pass --kubeconfig)",
            )?,
        };
        let context_name = self
            .context
            .clone()
            .or_else(|| kubeconfig.current_context.clone())
            .ok_or_else(|| anyhow!("the kubeconfig has no current-context; pass --context"))?;
        let context = kubeconfig
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .and_then(|c| c.context.clone())
            .ok_or_else(|| anyhow!("the kubeconfig has no context named {context_name:?}"))?;
        let extension = kubeconfig
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.as_ref())
            .and_then(|c| c.extensions.as_ref())
            .and_then(|exts| exts.iter().find(|e| e.name == KUBECONFIG_EXTENSION))
            .map(|e| e.extension.clone())
            .unwrap_or_default();
        let options = KubeConfigOptions {
            context: Some(context_name.clone()),
            ..Default::default()
        };
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .with_context(|| format!("loading the kubeconfig context {context_name:?}"))?;
        let server = self
            .server
            .clone()
            .or_else(|| extension_string(&extension, "server"))
            .ok_or_else(|| {
                anyhow!(
                    "no approvals API address: pass --server, set ${SERVER_ENV}, or add the `{KUBECONFIG_EXTENSION}` extension to the kubeconfig cluster {:?} (docs/approver-guide.md)",
                    context.cluster
                )
            })?;
        config.cluster_url = server
            .parse()
            .with_context(|| format!("the approvals API address {server:?} is not a URL"))?;
        if !server.starts_with("https://") {
            anyhow::bail!("the approvals API address {server:?} must be https://");
        }
        let ca_pem = match &self.certificate_authority {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("reading the CA bundle {}", path.display()))?,
            ),
            None => match extension_string(&extension, "certificate-authority-data") {
                Some(data) => Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(data.trim())
                        .context(
                            "the kubeconfig extension's certificate-authority-data is not base64",
                        )?,
                ),
                None => None,
            },
        };
        if let Some(pem) = ca_pem {
            use rustls_pki_types::{CertificateDer, pem::PemObject as _};
            let certs = CertificateDer::pem_slice_iter(&pem)
                .map(|c| c.map(|c| c.to_vec()))
                .collect::<Result<Vec<_>, _>>()
                .context("the approvals API CA bundle is not PEM")?;
            anyhow::ensure!(
                !certs.is_empty(),
                "the approvals API CA bundle holds no certificate"
            );
            config.root_cert = Some(certs);
        }
        if let Some(name) = self
            .tls_server_name
            .clone()
            .or_else(|| extension_string(&extension, "tls-server-name"))
        {
            config.tls_server_name = Some(name);
        }
        if let Some(token) = &self.token {
            config.auth_info = kube::config::AuthInfo {
                token: Some(token.clone().into()),
                ..Default::default()
            };
        }
        // A decision is not sent again behind the user's back: a 504 ("it may have been
        // written") is for the user to look at (`chaperone requests`), and kube-rs's
        // retries would back off for minutes.
        config.default_retry = false;
        kube::Client::try_from(config).context("building the client for the approvals API")
    }

    fn query(&self, extra: &[&str]) -> String {
        let mut parts: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        if let Some(ns) = &self.namespace {
            parts.push(format!("namespace={ns}"));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }
}

/// Turns a failed call into kubectl's wording: `Error from server (Forbidden): ...`.
fn explain(e: kube::Error) -> anyhow::Error {
    match e {
        kube::Error::Api(status) => anyhow!(
            "Error from server ({}): {}",
            if status.reason.is_empty() {
                status.code.to_string()
            } else {
                status.reason.clone()
            },
            status.message
        ),
        other => anyhow!("cannot reach the approvals API: {other}"),
    }
}

fn request(
    method: http::Method,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<http::Request<Vec<u8>>> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json")
        .body(body)
        .context("building the request")
}

/// `text` with control characters written as escapes: an AccessRequest's fields come
/// partly from what an agent sent, and an escape sequence printed raw could redraw the
/// approver's terminal (hide `rm -rf` behind `get pods`).
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        text.chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// One table row for a request.
pub fn row(r: &AccessRequest) -> String {
    let status = r.status.clone().unwrap_or_default();
    let s = &r.spec;
    let target = format!(
        "{} {}{}",
        s.request.verb,
        s.request.resource,
        match (&s.request.namespace, &s.request.name) {
            (Some(ns), Some(n)) => format!(" {ns}/{n}"),
            (None, Some(n)) => format!(" {n}"),
            (Some(ns), None) => format!(" -n {ns}"),
            (None, None) => String::new(),
        }
    );
    format!(
        "{:<28} {:<9} {:<32} {:<40} {:<21} {}",
        printable(r.metadata.name.as_deref().unwrap_or("")),
        status.phase.as_str(),
        printable(&format!(
            "{}/{}",
            s.requester.workload.namespace, s.requester.workload.pod
        )),
        printable(&target),
        printable(&s.expires_at),
        printable(&s.request.summary)
    )
}

/// The table header.
pub fn header() -> String {
    format!(
        "{:<28} {:<9} {:<32} {:<40} {:<21} {}",
        "NAME", "PHASE", "WORKLOAD", "REQUEST", "EXPIRES", "SUMMARY"
    )
}

fn print_objects(value: &serde_json::Value, output: Output) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(value)?)?,
        Output::Yaml => write!(out, "{}", serde_norway::to_string(value)?)?,
        Output::Name => {
            let items = value["items"]
                .as_array()
                .cloned()
                .unwrap_or_else(|| vec![value.clone()]);
            for item in items {
                writeln!(
                    out,
                    "accessrequest.chaperone.dev/{}",
                    item["metadata"]["name"].as_str().unwrap_or("")
                )?;
            }
        }
    }
    Ok(())
}

/// Whether a watch event shows something not printed yet: a watch opened again starts
/// with every AccessRequest as `ADDED`, and those whose resourceVersion was printed
/// already are left out. Remembers what it lets through; deletions always show.
fn changed(printed: &mut HashMap<String, String>, event: &serde_json::Value) -> bool {
    let meta = &event["object"]["metadata"];
    let key = meta["uid"]
        .as_str()
        .or_else(|| meta["name"].as_str())
        .unwrap_or_default()
        .to_owned();
    let version = meta["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if event["type"] == "DELETED" {
        printed.remove(&key);
        return true;
    }
    if version.is_empty() {
        return true;
    }
    printed.insert(key, version.clone()).as_deref() != Some(version.as_str())
}

/// `requests [NAME] [-w] [-o json|yaml|name]`.
pub async fn requests(
    conn: &Connection,
    name: Option<&str>,
    watch: bool,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let client = conn.client().await?;
    if watch {
        anyhow::ensure!(
            name.is_none(),
            "-w watches every request; leave out the name"
        );
        // The approvals API ends a watch after half an hour or so (the caller is then
        // authorised again); watch again, printing only what changed since.
        let mut printed: HashMap<String, String> = HashMap::new();
        let mut first = true;
        loop {
            let opened = std::time::Instant::now();
            let req = request(
                http::Method::GET,
                &format!("{BASE_PATH}{}", conn.query(&["watch=true"])),
                Vec::new(),
            )?;
            let response = client
                .send(req.map(kube::client::Body::from))
                .await
                .map_err(explain)?;
            let code = response.status();
            let mut body = response.into_body();
            if !code.is_success() {
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                return Err(match serde_json::from_slice::<kube::core::Status>(&bytes) {
                    Ok(status) => explain(kube::Error::Api(Box::new(status))),
                    Err(_) => anyhow!("the approvals API answered {code}"),
                });
            }
            if std::mem::take(&mut first) && output.is_none() {
                println!("{}", header());
            }
            let mut pending: Vec<u8> = Vec::new();
            while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                let frame = frame.map_err(|e| anyhow!("the watch broke off: {e}"))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let event: serde_json::Value = serde_json::from_slice(&line)
                        .context("the watch sent something that is not JSON")?;
                    // The watch could not go on (its Status says why); it ends, and is
                    // opened again below.
                    if event["type"] == "ERROR" {
                        eprintln!(
                            "the watch ended: {}; watching again",
                            event["object"]["message"].as_str().unwrap_or("an error")
                        );
                        continue;
                    }
                    if !changed(&mut printed, &event) {
                        continue;
                    }
                    match output {
                        Some(Output::Json) => println!("{}", serde_json::to_string(&event)?),
                        Some(o) => print_objects(&event["object"], o)?,
                        None => {
                            let object: AccessRequest = serde_json::from_value(
                                event["object"].clone(),
                            )
                            .context("the watch sent an object that is not an AccessRequest")?;
                            println!("{}", row(&object));
                        }
                    }
                    std::io::stdout().flush()?;
                }
            }
            // A watch that ended at once (a gateway going away) is not retried in a loop.
            if opened.elapsed() < std::time::Duration::from_secs(1) {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
    let path = match name {
        Some(n) => format!("{BASE_PATH}/{n}{}", conn.query(&[])),
        None => format!("{BASE_PATH}{}", conn.query(&[])),
    };
    let text = client
        .request_text(request(http::Method::GET, &path, Vec::new())?)
        .await
        .map_err(explain)?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .context("the approvals API answered something that is not JSON")?;
    if let Some(output) = output {
        return print_objects(&value, output);
    }
    let items: Vec<AccessRequest> = match name {
        Some(_) => vec![serde_json::from_value(value).context("not an AccessRequest")?],
        None => {
            serde_json::from_value(value["items"].clone()).context("not an AccessRequest list")?
        }
    };
    if items.is_empty() {
        eprintln!("No access requests found.");
        return Ok(());
    }
    println!("{}", header());
    for item in &items {
        println!("{}", row(item));
    }
    Ok(())
}

/// `approve NAME [--for D] [--comment C]` and `deny NAME [--comment C]`.
pub async fn decide(
    conn: &Connection,
    name: &str,
    approve: bool,
    for_: Option<String>,
    comment: Option<String>,
) -> anyhow::Result<()> {
    let client = conn.client().await?;
    let body = serde_json::to_vec(&DecisionRequest { for_, comment })?;
    let action = if approve { "approve" } else { "deny" };
    let text = client
        .request_text(request(
            http::Method::POST,
            &format!("{BASE_PATH}/{name}/{action}{}", conn.query(&[])),
            body,
        )?)
        .await
        .map_err(explain)?;
    let decided: AccessRequest = serde_json::from_str(&text)
        .context("the approvals API answered something that is not an AccessRequest")?;
    let status = decided.status.unwrap_or_default();
    let until = status
        .grant_until
        .map(|t| format!(" (granted until {t})"))
        .unwrap_or_default();
    println!(
        "accessrequest.chaperone.dev/{name} {}{until}",
        status.phase.as_str().to_lowercase()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_opened_again_prints_only_what_changed() {
        let event = |kind: &str, uid: &str, version: &str| {
            serde_json::json!({"type": kind, "object": {"metadata": {
                "name": format!("ar-{uid}"), "uid": uid, "resourceVersion": version}}})
        };
        let mut printed = HashMap::new();
        assert!(changed(&mut printed, &event("ADDED", "1", "10")));
        assert!(changed(&mut printed, &event("ADDED", "2", "11")));
        assert!(changed(&mut printed, &event("MODIFIED", "1", "12")));
        // The watch is opened again: its first events repeat what is known.
        assert!(!changed(&mut printed, &event("ADDED", "1", "12")));
        assert!(!changed(&mut printed, &event("ADDED", "2", "11")));
        assert!(changed(&mut printed, &event("ADDED", "3", "13")));
        assert!(changed(&mut printed, &event("DELETED", "2", "14")));
        // A request deleted and created again under its name is a new object.
        let mut again = event("ADDED", "5", "15");
        again["object"]["metadata"]["name"] = "ar-2".into();
        assert!(changed(&mut printed, &again));
        assert!(changed(
            &mut printed,
            &serde_json::json!({"type": "ADDED", "object": {}})
        ));
    }

    #[test]
    fn rows_print_control_characters_as_escapes() {
        assert_eq!(printable("get pods"), "get pods");
        assert_eq!(
            printable("rm -rf /\u{1b}[2K\rget pods"),
            "rm -rf /\\u{1b}[2K\\rget pods"
        );
        let mut ar = AccessRequest::new(
            "ar-1",
            super::super::resource::AccessRequestSpec {
                requester: Default::default(),
                request: Default::default(),
                fingerprint: String::new(),
                rule: String::new(),
                approvers: Default::default(),
                grant: Default::default(),
                node: String::new(),
                created_at: String::new(),
                expires_at: String::new(),
            },
        );
        ar.spec.request.summary = "exec rm -rf /\u{1b}[1A\u{7}".to_owned();
        let line = row(&ar);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("\\u{1b}[1A\\u{7}"), "{line}");
    }
}
