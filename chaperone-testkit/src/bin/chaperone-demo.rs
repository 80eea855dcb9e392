//! `chaperone-demo`: a sandboxed agent pod running real kubectl, intercepted by eBPF,
//! policed and recorded, against the Kubernetes API test server. Needs root. Run it with
//! `cargo xtask demo`.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

/// Runs the self-contained demo (no cluster needed).
#[derive(Debug, Parser)]
#[command(name = "chaperone-demo")]
struct Args {
    /// Keep the recordings in this directory instead of a temporary one.
    #[arg(long)]
    recordings: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The gateway's log goes to a file the demo names, so the story reads without log
    // lines in between.
    let log = std::env::temp_dir().join(format!(
        "chaperone-demo-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    ));
    match std::fs::File::create(&log) {
        Ok(file) => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        Err(e) => eprintln!(
            "warning: cannot create {}: {e}; the gateway's log is off",
            log.display()
        ),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(chaperone_testkit::demo::run(args.recordings, &log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
