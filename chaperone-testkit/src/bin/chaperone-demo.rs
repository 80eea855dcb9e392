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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(chaperone_testkit::demo::run(args.recordings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
