//! `chaperone`: parse the command line, run it, map the outcome to an exit code.

use std::process::ExitCode;

use gateway_userspace::cli;

/// mimalloc rather than the system allocator: the request path allocates small, short-lived
/// buffers on several threads, and glibc's malloc and free were 11% of the gateway's CPU
/// time per request (docs/benchmarks.md). Built with `no_thp`: with transparent huge
/// pages, mimalloc's eagerly committed arenas doubled the idle RSS (25 to 53 MiB).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    gateway_userspace::alloc::tune();
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
