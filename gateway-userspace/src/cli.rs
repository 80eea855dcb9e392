//! The `chaperone` command line: the binary's front, so it reports errors with `anyhow`.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error (clap's own).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    app,
    config::{Config, PolicyConfig},
};

/// Chaperone: a transparent gateway between AI agents in Kubernetes pods and the API
/// server. It attributes each request to the calling pod from the kernel, allows, denies
/// or masks it by policy (rules on verbs, resources, callers, content and exec commands),
/// forwards it with the gateway's own credential, masks Secrets and credentials in what
/// the agent reads, and records every request to Parquet, refusing what it cannot record.
#[derive(Debug, Parser)]
#[command(name = "chaperone", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CHAPERONE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway daemon.
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Overrides `listen.address` (the DaemonSet passes `$(NODE_IP):15443`).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Show the running daemon's interception state: attached programs, targets, map
    /// occupancy, bypass entries and connect-path counters.
    Status {
        /// The daemon's admin endpoint.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Detach Chaperone's eBPF programs and remove every pinned map (the DaemonSet's
    /// uninstall step; a normal stop keeps them so pods fail closed).
    Uninstall {
        /// The bpffs directory the daemon pinned under.
        #[arg(long, default_value = crate::ebpf::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Work with policy files.
    Policy {
        /// What to do with them.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Check a recording tree for tampering: every manifest's hash chain (and signatures,
    /// with `--public-key`), every listed file's size and SHA-256, and that every finished
    /// file is listed in its own node's manifest. Prints each problem; exits 1 if any.
    Verify {
        /// The recording directory (`recording.dir`), or its copy in object storage:
        /// `s3://BUCKET/PREFIX` (credentials from `AWS_ACCESS_KEY_ID` and
        /// `AWS_SECRET_ACCESS_KEY`).
        dir: String,
        /// The ed25519 public key (PEM) the manifests must be signed with; without it
        /// signatures are not checked (and the output says so).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// For `s3://`: an S3-compatible endpoint (`http(s)://host:port`); default AWS.
        #[arg(long)]
        endpoint: Option<String>,
        /// For `s3://`: the signing region.
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// For `s3://` over https: a CA bundle (default: the system's).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Check configuration or policy files without starting anything.
    Check {
        /// A config file to validate (with the policy files it names).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Policy files to validate.
        #[arg(long = "policy")]
        policies: Vec<PathBuf>,
    },
    /// Print the CustomResourceDefinition of Chaperone's `AccessRequest` resource (the one
    /// shipped in deploy/crds/), generated from the gateway's own types.
    Crd,
    /// List the access requests waiting for (or past) a decision, or show one
    /// (through the approvals API, with your kubeconfig's credential).
    #[command(visible_alias = "request", visible_alias = "ar")]
    Requests {
        /// One request to show.
        name: Option<String>,
        /// Keep watching and print each change.
        #[arg(long, short = 'w')]
        watch: bool,
        /// Output format (default: a table).
        #[arg(long, short = 'o', value_enum)]
        output: Option<crate::approval::client::Output>,
        /// How to reach the approvals API.
        #[command(flatten)]
        connection: crate::approval::client::Connection,
    },
    /// Approve a held request: the agent's request proceeds (and, for a lasting grant,
    /// matching requests for `--for`).
    Approve {
        /// The AccessRequest's name.
        name: String,
        /// How long the approval lasts (within the rule's grant), e.g. 15m.
        #[arg(long = "for")]
        for_: Option<String>,
        /// A comment, recorded with the decision.
        #[arg(long)]
        comment: Option<String>,
        /// How to reach the approvals API.
        #[command(flatten)]
        connection: crate::approval::client::Connection,
    },
    /// Deny a held request: the agent gets a 403 carrying your comment.
    Deny {
        /// The AccessRequest's name.
        name: String,
        /// Why (the agent sees it).
        #[arg(long)]
        comment: Option<String>,
        /// How to reach the approvals API.
        #[command(flatten)]
        connection: crate::approval::client::Connection,
    },
}

/// `chaperone policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Decide the requests of YAML fixtures with a policy, without a cluster: prints each
    /// decision and the rule that made it; exits 1 when a request is denied (or, for a
    /// fixture with `expect`, decided otherwise). The fixture format is in
    /// docs/policy-reference.md.
    Test {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// Fixture files (one request, or a list under `requests:`).
        #[arg(required = true)]
        fixtures: Vec<PathBuf>,
    },
}

/// `chaperone verify`.
async fn verify(
    target: &str,
    public_key: Option<&std::path::Path>,
    endpoint: Option<String>,
    region: String,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use crate::recorder::{manifest, upload};
    let key = public_key
        .map(manifest::load_public_key)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let report = if let Some(rest) = target.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        anyhow::ensure!(
            !bucket.is_empty(),
            "{target}: no bucket (s3://BUCKET/PREFIX)"
        );
        let settings = upload::UploadSettings {
            endpoint,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            region,
            access_key_id: None,
            secret_access_key: None,
            every: std::time::Duration::from_secs(1),
            max_local_bytes: None,
            max_retries: 2,
        };
        let tls = upload::tls_for(ca_file).map_err(anyhow::Error::msg)?;
        let tree = upload::read_remote_tree(&settings, tls)
            .await
            .map_err(anyhow::Error::msg)?;
        manifest::verify_tree(&tree, key.as_ref())
    } else {
        let dir = std::path::Path::new(target);
        anyhow::ensure!(
            dir.is_dir(),
            "{}: not a directory (give the recording directory, recording.dir, or s3://BUCKET/PREFIX)",
            dir.display()
        );
        manifest::verify_dir(dir, key.as_ref()).map_err(anyhow::Error::msg)?
    };
    let dir = target;
    for problem in &report.problems {
        println!("FAIL {problem}");
    }
    let signatures = if key.is_some() {
        format!("{} signatures checked", report.signatures_checked)
    } else {
        "signatures NOT checked (no --public-key)".to_owned()
    };
    println!(
        "{dir}: {} manifests, {} entries, {} files hashed, {signatures}",
        report.manifests, report.entries, report.files
    );
    anyhow::ensure!(
        report.ok(),
        "{} problem(s) found: the recording was modified, truncated, removed, reordered, added to or re-signed",
        report.problems.len()
    );
    if report.manifests == 0 {
        anyhow::bail!("no manifest under {dir}: nothing vouches for these files");
    }
    println!("ok");
    Ok(())
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, listen } => {
            let mut cfg = Config::load(&config)?;
            if let Some(listen) = listen {
                cfg.listen.address = listen;
                cfg.revalidate(&config.display().to_string())?;
            }
            let stats = app::build(cfg).await?.wait_termination().await?;
            tracing::info!(rows = stats.rows, "stopped");
            Ok(())
        }
        Command::Status { admin, json } => status(admin, json).await,
        Command::Requests {
            name,
            watch,
            output,
            connection,
        } => crate::approval::client::requests(&connection, name.as_deref(), watch, output).await,
        Command::Approve {
            name,
            for_,
            comment,
            connection,
        } => crate::approval::client::decide(&connection, &name, true, for_, comment).await,
        Command::Deny {
            name,
            comment,
            connection,
        } => crate::approval::client::decide(&connection, &name, false, None, comment).await,
        Command::Crd => {
            print!("{}", crate::approval::resource::crd_yaml()?);
            Ok(())
        }
        Command::Verify {
            dir,
            public_key,
            endpoint,
            region,
            ca_file,
        } => {
            verify(
                &dir,
                public_key.as_deref(),
                endpoint,
                region,
                ca_file.as_deref(),
            )
            .await
        }
        Command::Policy {
            command: PolicyCommand::Test { policy, fixtures },
        } => policy_test(&policy, &fixtures),
        Command::Uninstall { pin_path } => {
            crate::ebpf::uninstall(&pin_path)?;
            println!(
                "removed {} (programs detached, maps unpinned)",
                pin_path.display()
            );
            Ok(())
        }
        Command::Check { config, policies } => {
            let mut files = policies;
            if let Some(config) = config {
                let cfg = Config::load(&config)?;
                // The CA key is what a cluster hands over in whatever format it has: load it
                // now, as `run` would, rather than fail at start-up.
                if !cfg.tls.create_ca_if_missing || cfg.tls.ca_cert_file.exists() {
                    crate::tls::CertificateAuthority::from_files(
                        &cfg.tls.ca_cert_file,
                        &cfg.tls.ca_key_file,
                    )
                    .with_context(|| format!("checking {}", config.display()))?;
                }
                println!("{}: ok", config.display());
                match &cfg.policy {
                    Some(PolicyConfig::File(file)) => files.push(file.clone()),
                    Some(PolicyConfig::AllowAll) | None => {
                        println!("policy: allowAll (no policy: every request is forwarded)");
                    }
                }
            }
            for file in &files {
                let policy = crate::policy::Policy::from_file(file)
                    .with_context(|| format!("checking {}", file.display()))?;
                println!("{}: ok ({} rules)", file.display(), policy.rule_count());
            }
            Ok(())
        }
    }
}

/// `chaperone policy test`.
fn policy_test(policy: &std::path::Path, fixtures: &[PathBuf]) -> anyhow::Result<()> {
    use crate::policy::fixture;
    let loaded = crate::policy::Policy::from_file(policy)
        .with_context(|| format!("loading {}", policy.display()))?;
    let (mut passed, mut failed) = (0, 0);
    for file in fixtures {
        let requests = fixture::load(file).map_err(anyhow::Error::msg)?;
        for (i, f) in requests.iter().enumerate() {
            let outcome = fixture::decide_fixture(&loaded, f)
                .map_err(|e| anyhow::anyhow!("{}: request {i}: {e}", file.display()))?;
            let verdict = if outcome.passed { "PASS" } else { "FAIL" };
            let expected = match outcome.expected {
                Some(want) if want != outcome.decision.action => format!(" (expected {want})"),
                _ => String::new(),
            };
            let failed_note = if outcome.condition_failed {
                " [condition failed]"
            } else {
                ""
            };
            println!(
                "{verdict}  {}: {}{expected}{failed_note}\n      {}",
                outcome.label,
                outcome.decision.action,
                outcome.decision.reason()
            );
            if let Some(masking) = &outcome.decision.masking {
                let rules: Vec<&str> = masking.rules().iter().map(|r| &**r).collect();
                println!("      masked by rule(s): {}", rules.join(", "));
            }
            if outcome.passed {
                passed += 1;
            } else {
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    anyhow::ensure!(failed == 0, "{failed} request(s) did not pass");
    Ok(())
}

async fn status(admin: std::net::SocketAddr, json: bool) -> anyhow::Result<()> {
    use http_body_util::{BodyExt as _, Empty};
    let tcp = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!("connecting to the admin endpoint {admin} (is chaperone running?)")
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let request = http::Request::get("/status")
        .header(http::header::HOST, admin.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "{admin}/status answered {}",
        response.status()
    );
    let body = response.into_body().collect().await?.to_bytes();
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(&body).context("parsing /status")?;
    println!("listen:    {}", v["listen"].as_str().unwrap_or("?"));
    println!("upstream:  {}", v["upstream"].as_str().unwrap_or("?"));
    let p = &v["policy"];
    println!(
        "policy:    {} ({} rules, default {})",
        p["source"].as_str().unwrap_or("?"),
        p["rules"],
        p["default"].as_str().unwrap_or("?")
    );
    if let Some(digest) = p["digest"].as_str().filter(|d| !d.is_empty()) {
        println!(
            "           sha256 {} loaded {}",
            &digest[..digest.len().min(12)],
            p["loaded_at"].as_str().unwrap_or("?")
        );
    }
    if let Some(error) = p["reload_error"].as_str() {
        println!("           RELOAD FAILED, previous policy in force: {error}");
    }
    let r = &v["recording"];
    if r["up"].as_bool() == Some(true) {
        println!("recording: up");
    } else {
        println!(
            "recording: DOWN ({}); requests that must be recorded are refused",
            r["cause"].as_str().unwrap_or("unknown cause")
        );
    }
    println!(
        "           {} outages, {} rows lost",
        r["outages"], r["rows_lost"]
    );
    let i = &v["interception"];
    if i.is_null() {
        println!("interception: off (mode none)");
        return Ok(());
    }
    let list = |key: &str| -> String {
        i[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.to_string().trim_matches('"').to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    println!("pins:      {}", i["pin_dir"].as_str().unwrap_or("?"));
    println!("cgroup:    {}", i["cgroup_root"].as_str().unwrap_or("?"));
    println!("programs:  {}", list("programs"));
    println!("targets:   {}", list("targets"));
    println!("bypass:    {}", list("bypass"));
    println!("fail-open: {}", list("fail_open"));
    println!(
        "map:       {} / {} connections",
        i["connections"], i["connections_max"]
    );
    if let Some(counters) = i["counters"].as_object() {
        for (name, value) in counters {
            println!("  {name:<15} {value}");
        }
    }
    Ok(())
}

/// The program name when run as the kubectl plugin (`kubectl-chaperone` on `PATH`,
/// found by kubectl for `kubectl chaperone ...`).
pub const KUBECTL_PLUGIN: &str = "kubectl-chaperone";

/// Whether `argv0` names the kubectl plugin (a link or copy called `kubectl-chaperone`).
pub fn is_kubectl_plugin(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == KUBECTL_PLUGIN || n.starts_with("kubectl-chaperone."))
}

/// Parses the command line; run as `kubectl-chaperone`, usage and errors say
/// `kubectl chaperone`.
pub fn parse() -> Cli {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let plugin = args.first().is_some_and(|a| is_kubectl_plugin(a));
    let mut command = Cli::command();
    if plugin {
        command = command
            .name("kubectl chaperone")
            .bin_name("kubectl chaperone");
    }
    let matches = command.get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Installs the tracing subscriber (`RUST_LOG` filters; default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
