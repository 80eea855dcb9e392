//! The `chaperone` command line: the binary's front, so it reports errors with `anyhow`.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error (clap's own).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{app, config::Config};

/// Chaperone: a transparent gateway that records, masks, blocks and holds for approval
/// what AI agents do to a Kubernetes cluster.
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
    /// Check configuration or policy files without starting anything.
    Check {
        /// A config file to validate (with the policy files it names).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Policy files to validate.
        #[arg(long = "policy")]
        policies: Vec<PathBuf>,
    },
    /// Run the self-contained demo: a sandboxed agent pod running real kubectl, intercepted
    /// by eBPF, policed and recorded, against the Kubernetes API test server. Needs root.
    #[cfg(feature = "testing")]
    Demo {
        /// Keep the recordings in this directory instead of a temporary one.
        #[arg(long)]
        recordings: Option<PathBuf>,
    },
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
        Command::Check { config, policies } => {
            let mut files = policies;
            if let Some(config) = config {
                let cfg = Config::load(&config)?;
                println!("{}: ok", config.display());
                files.extend(cfg.policy.file);
            }
            for file in &files {
                let policy = crate::policy::Policy::from_file(file)
                    .with_context(|| format!("checking {}", file.display()))?;
                println!("{}: ok ({} rules)", file.display(), policy.rule_count());
            }
            Ok(())
        }
        #[cfg(feature = "testing")]
        Command::Demo { recordings } => crate::test_helpers::demo::run(recordings).await,
    }
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
