//! The `chaperone` command line: the binary's front, so it reports errors with `anyhow`.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error (clap's own).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    app,
    config::{Config, PolicyConfig},
    recorder::{
        ExecFrameRecord, RequestRecord,
        replay::{PlayOptions, ReplayEvent},
        sessions::{SessionFilter, SessionType},
    },
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
    /// List recorded sessions: exec, attach and port-forward streams, and each workload's
    /// runs of requests, with who, when, pod, command, duration and outcome.
    Sessions {
        /// The recording directory.
        #[arg(long, default_value = DEFAULT_RECORDINGS_DIR)]
        dir: PathBuf,
        /// Only sessions of pods in this namespace.
        #[arg(long, short)]
        namespace: Option<String>,
        /// Only sessions of this workload: a pod name, a prefix ending in `*`, or a service
        /// account.
        #[arg(long, short)]
        workload: Option<String>,
        /// Only sessions that started at or after this (RFC 3339, or an age: 30m, 2h, 7d).
        #[arg(long, value_parser = parse_time)]
        since: Option<jiff::Timestamp>,
        /// Only sessions that started before this (RFC 3339, or an age).
        #[arg(long, value_parser = parse_time)]
        until: Option<jiff::Timestamp>,
        /// Only sessions of this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// A pause longer than this ends a workload's run of requests.
        #[arg(long, default_value = "5m", value_parser = parse_age)]
        gap: std::time::Duration,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = ListFormat::Table)]
        output: ListFormat,
    },
    /// Play a recorded exec or attach session in the terminal with its timing (the output
    /// the agent received, masked as it was), with the workload's requests made meanwhile
    /// interleaved; a run of requests plays its requests.
    Replay {
        /// The session id (`chaperone sessions` lists them).
        id: String,
        /// The recording directory.
        #[arg(long, default_value = DEFAULT_RECORDINGS_DIR)]
        dir: PathBuf,
        /// Speed factor (2 plays twice as fast).
        #[arg(long, default_value = "1", value_parser = parse_speed)]
        speed: f64,
        /// Print at once, without the recorded pauses.
        #[arg(long)]
        no_wait: bool,
        /// Leave out the requests made during the session.
        #[arg(long)]
        no_requests: bool,
        /// Longest pause played (idle time is cut to it).
        #[arg(long, default_value = "5s", value_parser = parse_age)]
        max_pause: std::time::Duration,
    },
    /// Export a recorded exec or attach session (asciicast v2 for `asciinema play`).
    Export {
        /// The session id.
        id: String,
        /// The recording directory.
        #[arg(long, default_value = DEFAULT_RECORDINGS_DIR)]
        dir: PathBuf,
        /// The format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Asciicast)]
        format: ExportFormat,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Leave out the requests made during the session.
        #[arg(long)]
        no_requests: bool,
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

/// Where the DaemonSet writes recordings (deploy/config/chaperone.yaml).
pub const DEFAULT_RECORDINGS_DIR: &str = "/var/lib/chaperone/recordings";

/// Output formats of `chaperone sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// Aligned columns.
    Table,
    /// One JSON array.
    Json,
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// asciicast v2, as `asciinema play` reads it.
    Asciicast,
}

/// Session kinds `--kind` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// exec streams.
    Exec,
    /// attach streams.
    Attach,
    /// port-forward streams.
    Portforward,
    /// A workload's run of requests.
    Requests,
}

impl From<KindArg> for SessionType {
    fn from(k: KindArg) -> SessionType {
        match k {
            KindArg::Exec => SessionType::Exec,
            KindArg::Attach => SessionType::Attach,
            KindArg::Portforward => SessionType::PortForward,
            KindArg::Requests => SessionType::Requests,
        }
    }
}

/// A point in time: RFC 3339 (`2026-12-03T10:00:00Z`), or an age (`90s`, `30m`, `2h`, `7d`).
fn parse_time(text: &str) -> Result<jiff::Timestamp, String> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let age = parse_age(text).map_err(|_| {
        format!(
            "{text:?} is neither an RFC 3339 time (2026-12-03T10:00:00Z) nor an age (30m, 2h, 7d)"
        )
    })?;
    jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::try_from(age).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())
}

/// An age or gap: a number followed by s, m, h or d.
fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (s, m, h or d)"))?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use s, m, h or d)"
            ));
        }
    };
    Ok(std::time::Duration::from_secs(seconds))
}

fn parse_speed(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "{text:?} is not a positive speed factor (e.g. 2 or 0.5)"
        )),
    }
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
        Command::Sessions {
            dir,
            namespace,
            workload,
            since,
            until,
            kind,
            gap,
            output,
        } => {
            let filter = SessionFilter {
                namespace,
                workload,
                since,
                until,
                kind: kind.map(SessionType::from),
            };
            sessions(&dir, &filter, gap, output)
        }
        Command::Replay {
            id,
            dir,
            speed,
            no_wait,
            no_requests,
            max_pause,
        } => {
            let options = PlayOptions {
                speed,
                no_wait,
                max_pause,
            };
            replay(&dir, &id, !no_requests, options)
        }
        Command::Export {
            id,
            dir,
            format: ExportFormat::Asciicast,
            output,
            no_requests,
        } => export(&dir, &id, !no_requests, output.as_deref()),
        Command::Uninstall { pin_path } => {
            crate::ebpf::uninstall(&pin_path)?;
            println!(
                "removed {} (programs detached, maps unpinned)",
                pin_path.display()
            );
            Ok(())
        }
        Command::Check { config, policies } => {
            anyhow::ensure!(
                config.is_some() || !policies.is_empty(),
                "nothing to check: pass --config FILE and/or --policy FILE"
            );
            let mut files = policies;
            // With a config: whether it can hold requests for approval.
            let mut approvals = None;
            if let Some(config) = config {
                let cfg = Config::load(&config)?;
                approvals = Some(cfg.approval.is_some());
                // The CA key is what a cluster hands over in whatever format it has: load it
                // now, as `run` would, rather than fail at start-up.
                if !cfg.tls.create_ca_if_missing || cfg.tls.ca_cert_file.exists() {
                    crate::tls::CertificateAuthority::from_files(
                        &cfg.tls.ca_cert_file,
                        &cfg.tls.ca_key_file,
                    )
                    .with_context(|| format!("checking {}", config.display()))?;
                }
                // The keys `run` loads at start, after the redirect is attached: a key that
                // does not load there takes the node's agents down with it.
                if let Some(approval) = &cfg.approval {
                    crate::approval::seal::SealKey::from_file(&approval.seal_key_file).map_err(
                        |e| {
                            anyhow::anyhow!(
                                "checking {}: approval.sealKeyFile: {e}",
                                config.display()
                            )
                        },
                    )?;
                }
                if let Some(key) = &cfg.recording.signing_key_file {
                    crate::recorder::manifest::load_signing_key(key).map_err(|e| {
                        anyhow::anyhow!(
                            "checking {}: recording.signingKeyFile: {e}",
                            config.display()
                        )
                    })?;
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
                let asking: Vec<&str> = policy.approve_rules().collect();
                anyhow::ensure!(
                    asking.is_empty() || approvals != Some(false),
                    "checking {}: rules {asking:?} ask for approval, but the config has no \
                     `approval` section, so every request they match would be refused (403)",
                    file.display()
                );
                println!("{}: ok ({} rules)", file.display(), policy.rule_count());
            }
            Ok(())
        }
    }
}

/// Reads a recording's requests and exec frames, with errors naming the directory.
fn read_recording(
    dir: &std::path::Path,
) -> anyhow::Result<(Vec<RequestRecord>, Vec<ExecFrameRecord>)> {
    anyhow::ensure!(
        dir.is_dir(),
        "recording directory {} does not exist (pass --dir)",
        dir.display()
    );
    let requests = crate::recorder::read_dir(dir)
        .with_context(|| format!("reading the requests table under {}", dir.display()))?;
    let frames = crate::recorder::read_exec_frames(dir)
        .with_context(|| format!("reading the exec_frames table under {}", dir.display()))?;
    Ok((requests, frames))
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `chaperone sessions`.
fn sessions(
    dir: &std::path::Path,
    filter: &SessionFilter,
    gap: std::time::Duration,
    format: ListFormat,
) -> anyhow::Result<()> {
    let (requests, frames) = read_recording(dir)?;
    let list = crate::recorder::sessions::list_sessions(&requests, &frames, gap, filter);
    if format == ListFormat::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<40} {:<11} {:<20} {:>9} {:<32} {:<28} {:<24} {:<30} OUTCOME",
        "ID", "KIND", "START (UTC)", "DURATION", "WHO", "POD", "TARGET", "COMMAND"
    );
    for s in &list {
        let start = jiff::tz::Offset::UTC
            .to_datetime(s.start)
            .strftime("%Y-%m-%d %H:%M:%S")
            .to_string();
        let pod = match (&s.namespace, &s.pod) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            _ => "-".to_owned(),
        };
        println!(
            "{:<40} {:<11} {:<20} {:>9} {:<32} {:<28} {:<24} {:<30} {}",
            s.id,
            s.kind.as_str(),
            start,
            format!("{:.1}s", s.duration_ms as f64 / 1000.0),
            one_line(&s.who, 32),
            one_line(&pod, 28),
            one_line(s.target.as_deref().unwrap_or("-"), 24),
            one_line(s.command.as_deref().unwrap_or("-"), 30),
            one_line(&s.outcome, 60),
        );
    }
    eprintln!("{} session(s) in {}", list.len(), dir.display());
    Ok(())
}

/// The events of session `id` and its summary line.
fn session_events(
    dir: &std::path::Path,
    id: &str,
    with_requests: bool,
) -> anyhow::Result<(Vec<ReplayEvent>, String, jiff::Timestamp)> {
    use crate::recorder::sessions::{exec_command, requests_during, session_frames};
    let (requests, frames) = read_recording(dir)?;
    if let Some(first) = id.strip_prefix("run-") {
        // A run of requests: its requests, timed from the first.
        let list = crate::recorder::sessions::list_sessions(
            &requests,
            &frames,
            crate::recorder::sessions::DEFAULT_RUN_GAP,
            &SessionFilter::default(),
        );
        let run = list
            .iter()
            .find(|s| s.id == id)
            .with_context(|| format!("no session {id} in {}", dir.display()))?;
        let opening = requests
            .iter()
            .find(|r| r.audit_id == first)
            .with_context(|| format!("no request {first} in {}", dir.display()))?;
        let end = run
            .start
            .checked_add(jiff::SignedDuration::from_millis(run.duration_ms))
            .unwrap_or(run.start);
        let mut rows = vec![opening];
        rows.extend(requests_during(&requests, opening, end));
        rows.truncate(run.requests);
        let events = rows
            .iter()
            .map(|r| ReplayEvent::Request {
                offset_us: i64::try_from(r.request_time.duration_since(run.start).as_micros())
                    .unwrap_or(0),
                line: crate::recorder::sessions::request_line(r),
            })
            .collect();
        let title = format!(
            "chaperone run of requests by {} ({} requests)",
            run.who, run.requests
        );
        return Ok((events, title, run.start));
    }
    let rows = session_frames(&frames, id);
    anyhow::ensure!(
        !rows.is_empty(),
        "no session {id} in {} (`chaperone sessions --dir {}` lists them)",
        dir.display(),
        dir.display()
    );
    let opening = requests.iter().find(|r| r.audit_id == rows[0].audit_id);
    let last = rows[rows.len() - 1];
    let around = match (opening, with_requests) {
        (Some(opening), true) => requests_during(&requests, opening, last.time),
        _ => Vec::new(),
    };
    let events = crate::recorder::replay::replay_events(&rows, &around);
    let start = rows[0]
        .time
        .checked_sub(jiff::SignedDuration::from_micros(rows[0].offset_us))
        .unwrap_or(rows[0].time);
    let title = match opening {
        Some(r) => format!(
            "chaperone {} {}/{}: {}",
            r.object_ref.subresource,
            r.object_ref.namespace,
            r.object_ref.name,
            exec_command(&r.request_uri).unwrap_or_default()
        ),
        None => format!("chaperone session {id}"),
    };
    Ok((events, title, start))
}

/// `chaperone replay`.
fn replay(
    dir: &std::path::Path,
    id: &str,
    with_requests: bool,
    options: PlayOptions,
) -> anyhow::Result<()> {
    let (events, title, start) = session_events(dir, id, with_requests)?;
    eprintln!("[{title}, started {start}]");
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    crate::recorder::replay::play(&events, options, &mut out).context("writing the replay")?;
    drop(out);
    eprintln!("\r\n[end of session {id}]");
    Ok(())
}

/// `chaperone export`.
fn export(
    dir: &std::path::Path,
    id: &str,
    with_requests: bool,
    output: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let (events, title, start) = session_events(dir, id, with_requests)?;
    let cast = crate::recorder::replay::asciicast(&events, &title, start);
    match output {
        Some(path) => {
            std::fs::write(path, cast).with_context(|| format!("writing {}", path.display()))?
        }
        None => {
            use std::io::Write as _;
            std::io::stdout()
                .write_all(cast.as_bytes())
                .context("writing the export")?;
        }
    }
    Ok(())
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
    if let Some(error) = v["credential"]["error"].as_str() {
        println!("           CREDENTIAL UNAVAILABLE, requests are refused: {error}");
    }
    if let (Some(serving), Some(ca)) = (
        v["tls"]["serving_expires"].as_str(),
        v["tls"]["ca_expires"].as_str(),
    ) {
        println!("tls:       serving certificate until {serving} (renewed), CA until {ca}");
        let left = ca
            .parse::<jiff::Timestamp>()
            .ok()
            .map(|t| t.duration_since(jiff::Timestamp::now()));
        if let Some(left) = left.filter(|l| l.as_hours() < 30 * 24) {
            println!(
                "           CA EXPIRES in {} days: replace tls.caCertFile (and the bundle agents trust) before then",
                left.as_hours().max(0) / 24
            );
        }
    }
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
    let w = &r["wal"];
    if !w.is_null() {
        println!(
            "           write-ahead log: {} outstanding, {} segments, {} failed commits; {} rows replayed at start",
            w["outstanding"], w["segments"], w["failures"], r["replayed"]
        );
    }
    let u = &r["upload"];
    if !u.is_null() {
        println!(
            "           upload: {} files confirmed, {} pending (oldest {} s), {} failed rounds",
            u["uploaded"], u["pending"], u["lag_seconds"], u["failures"]
        );
    }
    let approvals = &v["approvals"];
    if !approvals.is_null() {
        let watch = if approvals["watch_current"].as_bool() == Some(true) {
            "AccessRequest watch current"
        } else {
            "AccessRequest watch NOT CURRENT (held requests read their AccessRequests every 15 s)"
        };
        println!("approvals: {} requests held; {watch}", approvals["waiting"]);
    }
    let pods = &v["pods"];
    let mut pods_degraded = false;
    if !pods.is_null() {
        if pods["listed"].as_bool() != Some(true) {
            pods_degraded = true;
            println!("pods:      NOT LISTED YET; connections from pods are refused until they are");
        } else if let Some(error) = pods["watch_error"].as_str() {
            pods_degraded = true;
            println!(
                "pods:      {} known; WATCH FAILING, connections from pods it does not know are refused: {error}",
                pods["count"]
            );
        } else {
            println!("pods:      {} known, watch current", pods["count"]);
        }
    }
    // Scripts and probes can tell a degraded gateway by the exit code.
    let degraded =
        r["up"].as_bool() != Some(true) || !v["credential"]["error"].is_null() || pods_degraded;
    let i = &v["interception"];
    if i.is_null() {
        println!("interception: off (mode none)");
        return degraded_result(degraded);
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
    degraded_result(degraded)
}

/// `chaperone status`'s result: an error (exit code 1) when the gateway refuses requests
/// because recording is down, it has no credential or it cannot name new pods.
fn degraded_result(degraded: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        !degraded,
        "the gateway is degraded: it refuses requests it cannot record, forward or attribute (see above)"
    );
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
