//! Developer tasks: `cargo xtask setup | demo | test | bench`.
//!
//! Every task installs what it needs first (idempotently, and quickly when already done),
//! so the two commands in README.md work on a fresh machine.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker) and test dependencies.
    Setup,
    /// Build chaperone and run its demo (needs root).
    Demo {
        /// Keep the recordings in this directory.
        #[arg(long)]
        recordings: Option<PathBuf>,
    },
    /// Run every test tier: unit, integration and privileged end-to-end (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Demo { recordings } => {
            setup()?;
            cargo(&[
                "build",
                "--package",
                "gateway-userspace",
                "--features",
                "testing",
                "--bin",
                "chaperone",
            ])?;
            let mut cmd = Command::new(workspace_root().join("target/debug/chaperone"));
            cmd.arg("demo");
            if let Some(dir) = recordings {
                cmd.arg("--recordings").arg(dir);
            }
            run(&mut cmd)
        }
        Task::Test { args } => {
            setup()?;
            let mut cargo_args = vec!["test", "--features", "gateway-userspace/testing"];
            cargo_args.extend(args.iter().map(String::as_str));
            cargo(&cargo_args)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(workspace_root()),
    )
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs what a fresh machine lacks; each step checks first, so a second run is fast.
fn setup() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_python_packages()?;
    for tool in ["kubectl", "ip", "nsenter"] {
        if !succeeds(Command::new("sh").args(["-c", &format!("command -v {tool}")])) {
            bail!("{tool} is not installed; the end-to-end tests and the demo need it");
        }
    }
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is needed to build the eBPF programs")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// bpf-linker must be built against the LLVM inside the nightly toolchain (system LLVM does
/// not match), with an rpath so it finds that library at run time.
fn ensure_bpf_linker() -> anyhow::Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let version = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .context("cannot read the LLVM major version")?
        .to_owned();
    let prefix = home().join(".cache/chaperone-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("symlink {}", link.display()))?;
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--locked",
            "--force",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{version}")])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
        ))?;
    Ok(())
}

fn ensure_python_packages() -> anyhow::Result<()> {
    if succeeds(Command::new("python3").args(["-c", "import duckdb, pyarrow, kubernetes"])) {
        return Ok(());
    }
    run(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "duckdb",
        "pyarrow",
        "kubernetes",
    ]))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}
