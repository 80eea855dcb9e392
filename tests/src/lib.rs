//! Shared helpers for Chaperone's workspace-level tests.
//!
//! Privileged tests create real cgroups, network namespaces and eBPF programs. Locally
//! without root they skip with a printed reason; with `CI` set they must run, so a CI
//! machine that cannot run them fails instead of passing vacuously.

pub mod clients;

/// How long any single client run may take.
pub const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a privileged test can run here. Prints why not, and panics under CI.
pub fn privileged(test: &str) -> bool {
    let root = nix_is_root();
    if root {
        return true;
    }
    let reason = "needs root (eBPF, cgroups, network namespaces)";
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {reason}, and CI is set: privileged tests must run in CI");
    }
    eprintln!("SKIPPED {test}: {reason}");
    false
}

fn nix_is_root() -> bool {
    // /proc/self/status "Uid:" line: real, effective, saved, fs.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A GET against the gateway's admin endpoint: the status code and body.
pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    chaperone_testkit::local::admin_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("the admin endpoint did not answer {path}"))
}

/// The path of a command-line tool from the Python tools environment that `cargo xtask
/// test` installs (moto's S3-compatible `moto_server`, `asciinema`): `$CHAPERONE_PYTOOLS/bin`,
/// by default `~/.cache/chaperone-pytools/bin`. Kept apart from the client libraries
/// because their dependency pins conflict.
pub fn python_tool(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("CHAPERONE_PYTOOLS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| "/root".into())
                .join(".cache/chaperone-pytools")
        });
    dir.join("bin").join(name)
}
