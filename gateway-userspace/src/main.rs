//! `chaperone`: parse the command line, run it, map the outcome to an exit code.

use std::process::ExitCode;

use gateway_userspace::cli;

fn main() -> ExitCode {
    // Also run as `kubectl-chaperone` (the kubectl plugin).
    let cli = cli::parse();
    cli::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
