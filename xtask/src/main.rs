//! Developer tasks: `cargo xtask setup | demo | test | bench | dist | release-check | gen-protobuf`.
//!
//! Every task installs what it needs first (idempotently, and quickly when already done),
//! so the two commands in README.md work on a fresh machine.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

mod protobuf_schema;
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
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark the gateway against nginx and the design targets (privileged parts need
    /// root); figures land in target/bench/.
    Bench,
    /// Build the release binary with profile-guided optimisation: an instrumented
    /// `chaperone` serves the benchmark's mix once, and the profile it leaves shapes the
    /// final build, target/dist/chaperone (about 14% less CPU per request than a plain
    /// release build; see docs/benchmarks.md).
    Dist,
    /// Build the workspace in release as a user would (`cargo build --release` at the root)
    /// and prove the `chaperone` binary holds the product only: the test kit is not in its
    /// dependency tree and its command line offers no demo.
    ReleaseCheck,
    /// Regenerate gateway-userspace/src/protobuf/schema.txt from the k8s-pb and
    /// k8s-openapi sources (downloads them if needed).
    GenProtobuf,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Demo { recordings } => {
            setup()?;
            cargo(&[
                "build",
                "--package",
                "chaperone-testkit",
                "--bin",
                "chaperone-demo",
            ])?;
            let mut cmd = Command::new(workspace_root().join("target/debug/chaperone-demo"));
            if let Some(dir) = recordings {
                cmd.arg("--recordings").arg(dir);
            }
            run(&mut cmd)
        }
        Task::Test { args } => {
            setup()?;
            // Every crate but the eBPF one (it only builds for the BPF target, through
            // gateway-userspace's build.rs); the test kit and tests are not default members.
            // `--no-fail-fast`: one failing test binary must not hide the others' results.
            let mut cargo_args = vec![
                "test",
                "--workspace",
                "--exclude",
                "gateway-ebpf",
                "--no-fail-fast",
            ];
            cargo_args.extend(args.iter().map(String::as_str));
            test_with_summary(&cargo_args)
        }
        Task::Bench => bench(),
        Task::Dist => dist().map(|bin| eprintln!("xtask: built {}", bin.display())),
        Task::ReleaseCheck => release_check(),
        Task::GenProtobuf => {
            let out = workspace_root().join("gateway-userspace/src/protobuf/schema.txt");
            let messages = protobuf_schema::generate(&out)?;
            eprintln!("xtask: wrote {} ({messages} messages)", out.display());
            Ok(())
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

/// A cargo command for the workspace, without the variables `cargo run` set for xtask
/// itself: build scripts that watch them (ring's watches `CARGO_MANIFEST_DIR`) would
/// otherwise rebuild half the tree whenever a build alternates between xtask and cargo.
pub(crate) fn cargo_command() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(workspace_root());
    cmd
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(cargo_command().args(args))
}

/// Runs `cargo test`, passing its output through, and closes with one line that adds up
/// every test binary's result (cargo's own last line is that of the last doc-test run).
fn test_with_summary(args: &[&str]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut cmd = cargo_command();
    cmd.args(args).stdout(std::process::Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| -> u64 {
                    rest.split(';')
                        .filter_map(|part| {
                            part.trim()
                                .trim_start_matches("ok. ")
                                .trim_start_matches("FAILED. ")
                                .strip_suffix(word)
                        })
                        .filter_map(|n| n.trim().parse::<u64>().ok())
                        .sum()
                };
                passed += count(" passed");
                failed += count(" failed");
                ignored += count(" ignored");
            }
        }
    }
    let status = child.wait()?;
    println!("summary: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
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
    if !succeeds(Command::new("python3").args(["-c", "import duckdb, pyarrow, pandas, kubernetes"]))
    {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "duckdb",
            "pyarrow",
            "pandas",
            "kubernetes",
        ]))?;
    }
    ensure_python_tools()
}

/// The directory of the Python virtual environment holding the command-line tools the
/// tests run as separate processes (moto's S3-compatible server, asciinema). They live
/// apart from the client libraries because their pins conflict (botocore wants an older
/// python-dateutil than the Kubernetes client). Tests find it through
/// `CHAPERONE_PYTOOLS` (set by `cargo xtask test`) or this default.
fn python_tools_dir() -> PathBuf {
    home().join(".cache/chaperone-pytools")
}

fn ensure_python_tools() -> anyhow::Result<()> {
    let dir = python_tools_dir();
    let bin = dir.join("bin");
    if bin.join("moto_server").exists() && bin.join("asciinema").exists() {
        return Ok(());
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(bin.join("pip")).args(["install", "--quiet", "moto[server]", "asciinema"]))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn release_check() -> anyhow::Result<()> {
    setup()?;
    cargo(&["build", "--release"])?;
    let tree = output(cargo_command().args([
        "tree",
        "--package",
        "gateway-userspace",
        "--edges",
        "normal,build",
        "--prefix",
        "none",
    ]))?;
    if let Some(line) = tree.lines().find(|l| l.starts_with("chaperone-testkit")) {
        bail!("the product crate depends on the test kit: {line}");
    }
    // What a root build compiles, with the features it enables: no test kit, and none of
    // the features only the test kit asks for.
    let root = output(cargo_command().args([
        "tree",
        "--edges",
        "normal,build,features",
        "--prefix",
        "none",
    ]))?;
    for forbidden in ["chaperone-testkit", "k8s-openapi feature \"schemars\""] {
        if let Some(line) = root.lines().find(|l| l.contains(forbidden)) {
            bail!("a root build compiles test-kit code: {line}");
        }
    }
    let help =
        output(Command::new(workspace_root().join("target/release/chaperone")).arg("--help"))?;
    if help.contains("demo") {
        bail!("the released chaperone offers test code (a demo) in --help:\n{help}");
    }
    if succeeds(Command::new(workspace_root().join("target/release/chaperone")).arg("demo")) {
        bail!("the released chaperone runs `chaperone demo`");
    }
    println!("release check: target/release/chaperone is the product alone (no test kit, no demo)");
    Ok(())
}

/// HTTP side by side with nginx, the eBPF connect() overhead, then the policy, recorder and
/// write-ahead log micro-benchmarks, and a summary of all figures against the design targets.
fn bench() -> anyhow::Result<()> {
    ensure_apt_tool("nginx", "nginx-light")?;
    ensure_apt_tool("h2load", "nghttp2-client")?;
    // The gateway under test is the binary that ships: `cargo xtask dist`'s, built with the
    // product's features (not the test kit's) and its profile.
    let gateway = dist()?;
    cargo(&[
        "build",
        "--release",
        "--package",
        "chaperone-e2e",
        "--bin",
        "http_bench",
        "--bin",
        "connect_bench",
    ])?;
    let root = workspace_root();
    run(Command::new(root.join("target/release/http_bench")).env("CHAPERONE_BIN", &gateway))?;
    let is_root = output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0");
    if is_root {
        run(&mut Command::new(root.join("target/release/connect_bench")))?;
    } else {
        eprintln!("xtask: not root, skipping connect_bench (the eBPF connect() overhead)");
    }
    cargo(&[
        "bench",
        "--package",
        "gateway-userspace",
        "--bench",
        "policy",
        "--bench",
        "recorder",
        "--bench",
        "masking",
        "--bench",
        "masking_streams",
        "--bench",
        "approval",
        "--bench",
        "approval_notify",
        "--bench",
        "wal",
        "--bench",
        "exec_recording",
        "--bench",
        "identity",
        "--",
        "--quick",
    ])?;
    // Decision latency percentiles (criterion reports medians; the targets are p99s). The
    // filter matches no criterion benchmark, so only the percentile runs happen.
    let latency = output(cargo_command().args([
        "bench",
        "--package",
        "gateway-userspace",
        "--bench",
        "policy",
        "--",
        "latency",
    ]))?;
    print!("{latency}");
    std::fs::create_dir_all(root.join("target/bench"))?;
    std::fs::write(root.join("target/bench/policy_latency.txt"), &latency)?;
    // Upload throughput to moto's S3 server on loopback (prints MiB/s).
    cargo(&[
        "test",
        "--release",
        "--package",
        "chaperone-e2e",
        "--test",
        "upload",
        "upload_throughput",
        "--",
        "--nocapture",
    ])?;
    print_bench_summary(&root.join("target"));
    Ok(())
}

/// Installs a Debian package when `tool` is missing, refreshing the package index once if
/// the first attempt fails (fresh containers ship without one).
/// Builds `chaperone` with profile-guided optimisation and returns its path
/// (target/dist/chaperone):
/// 1. `chaperone` instrumented (`-Cprofile-generate`), in its own target directory;
/// 2. `http_bench train` runs it as the gateway through the benchmark's mix (gets, masked
///    Secrets, lists, watches, exec, creates) and it writes its profile when it stops;
/// 3. the `llvm-profdata` of rustup's `llvm-tools` (the LLVM rustc itself uses) merges it;
/// 4. `chaperone` again with `-Cprofile-use`, in a second target directory.
///
/// Both builds are the same command but for the flag (`--package gateway-userspace --bin
/// chaperone`, the product's features only), so the profile's functions are the final
/// build's.
fn dist() -> anyhow::Result<PathBuf> {
    setup()?;
    ensure_apt_tool("h2load", "nghttp2-client")?;
    run(Command::new("rustup").args(["component", "add", "llvm-tools"]))?;
    let rustc = output(Command::new("rustc").arg("-vV"))?;
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("`rustc -vV` names no host")?
        .trim()
        .to_owned();
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let profdata_tool =
        Path::new(sysroot.trim()).join(format!("lib/rustlib/{host}/bin/llvm-profdata"));
    let root = workspace_root();
    let pgo = root.join("target/pgo");
    let raw = pgo.join("raw");
    if raw.exists() {
        std::fs::remove_dir_all(&raw).with_context(|| format!("removing {}", raw.display()))?;
    }
    std::fs::create_dir_all(&raw)?;
    let build = |target_dir: &str, flag: String| {
        let extra = std::env::var("RUSTFLAGS").unwrap_or_default();
        run(cargo_command()
            .args([
                "build",
                "--release",
                "--package",
                "gateway-userspace",
                "--bin",
                "chaperone",
            ])
            .args(["--target", host.as_str(), "--target-dir"])
            .arg(pgo.join(target_dir))
            // With `--target`, RUSTFLAGS reach the target's code only, not build scripts.
            .env("RUSTFLAGS", format!("{extra} {flag}").trim()))
    };
    build(
        "instrumented",
        format!("-Cprofile-generate={}", raw.display()),
    )?;
    cargo(&[
        "build",
        "--release",
        "--package",
        "chaperone-e2e",
        "--bin",
        "http_bench",
    ])?;
    run(Command::new(root.join("target/release/http_bench"))
        .arg("train")
        .env(
            "CHAPERONE_BIN",
            pgo.join(format!("instrumented/{host}/release/chaperone")),
        )
        .env("LLVM_PROFILE_FILE", raw.join("chaperone-%p.profraw")))?;
    let profile = pgo.join("chaperone.profdata");
    run(Command::new(&profdata_tool)
        .arg("merge")
        .arg("-o")
        .arg(&profile)
        .arg(&raw))?;
    build("optimised", format!("-Cprofile-use={}", profile.display()))?;
    let dist = root.join("target/dist");
    std::fs::create_dir_all(&dist)?;
    let bin = dist.join("chaperone");
    std::fs::copy(
        pgo.join(format!("optimised/{host}/release/chaperone")),
        &bin,
    )
    .with_context(|| format!("copying the optimised build to {}", bin.display()))?;
    Ok(bin)
}

fn ensure_apt_tool(tool: &str, package: &str) -> anyhow::Result<()> {
    if succeeds(Command::new("sh").args(["-c", &format!("command -v {tool}")])) {
        return Ok(());
    }
    let install = || {
        succeeds(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install() {
        return Ok(());
    }
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The number after `"key":` at or after `from` in a JSON text (criterion's files have a
/// fixed shape, so no JSON parser is needed here).
fn json_number_after(text: &str, anchor: &str, key: &str) -> Option<f64> {
    let start = text.find(anchor)?;
    let rest = &text[start..];
    let at = rest.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = rest[at..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Median time (ns) and element count of one criterion benchmark, from its last run.
fn criterion_figure(target: &Path, id: &str) -> Option<(f64, Option<f64>)> {
    let dir = target.join("criterion").join(id).join("new");
    let estimates = std::fs::read_to_string(dir.join("estimates.json")).ok()?;
    let median_ns = json_number_after(&estimates, "\"median\"", "point_estimate")?;
    let elements = std::fs::read_to_string(dir.join("benchmark.json"))
        .ok()
        .and_then(|b| json_number_after(&b, "\"throughput\"", "Elements"));
    Some((median_ns, elements))
}

/// Throughput (MB/s) of a criterion benchmark with a byte throughput, from its last run;
/// `dir` is its folder under target/criterion.
fn criterion_mb_per_s(target: &Path, dir: &str) -> Option<f64> {
    let path = target.join("criterion").join(dir).join("new");
    let median_ns = std::fs::read_to_string(path.join("estimates.json"))
        .ok()
        .and_then(|e| json_number_after(&e, "\"median\"", "point_estimate"))?;
    let bytes = std::fs::read_to_string(path.join("benchmark.json"))
        .ok()
        .and_then(|b| json_number_after(&b, "\"throughput\"", "Bytes"))?;
    Some(bytes / (median_ns / 1e9) / 1e6)
}

/// A percentile (`p99`) in µs from the policy bench's latency lines
/// (`LABEL p50 0.61 us  p90 ... p99 0.69 us ...`).
fn percentile_us(text: &str, label: &str, which: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == which)?;
    words.next()?.parse().ok()
}

fn print_bench_summary(target: &Path) {
    let bench = target.join("bench");
    let read = |name: &str| std::fs::read_to_string(bench.join(name)).unwrap_or_default();
    let summary = read("summary.json");
    let connect = read("connect.json");
    let http = |who: &str, key: &str| json_number_after(&summary, &format!("\"{who}\""), key);
    let show =
        |x: Option<f64>, unit: &str| x.map_or("n/a".to_owned(), |v| format!("{v:.1} {unit}"));
    println!();
    println!("Figures against the design targets (docs/benchmarks.md):");
    if let (Some(d), Some(n), Some(c)) = (
        http("direct", "p50_us"),
        http("nginx", "p50_us"),
        http("chaperone", "p50_us"),
    ) {
        println!(
            "  added p50 latency: chaperone {:.0} us, nginx {:.0} us   (target: <= 150 us and below nginx)",
            c - d,
            n - d
        );
    }
    if let (Some(n), Some(c)) = (
        http("nginx", "added_p50_paired_us"),
        http("chaperone", "added_p50_paired_us"),
    ) {
        println!(
            "  added p50 latency, back-to-back rounds: chaperone {c:.0} us, nginx {n:.0} us   (target: <= 150 us and below nginx)"
        );
    }
    if let Some(d) = http("chaperone", "p50_minus_nginx_paired_us") {
        println!("  p50, chaperone minus nginx in the same rounds: {d:+.0} us   (target: <= 0)");
    }
    if let (Some(n), Some(c)) = (http("nginx", "rps"), http("chaperone", "rps")) {
        println!(
            "  throughput at 64 connections: chaperone {c:.0} req/s = {:.0}% of nginx's {n:.0}   (target: >= 100%)",
            100.0 * c / n
        );
    }
    if let (Some(n), Some(c)) = (
        http("nginx", "cpu_us_per_req"),
        http("chaperone", "cpu_us_per_req"),
    ) {
        println!(
            "  CPU per request: chaperone {c:.1} us, nginx {n:.1} us = {:.0}%   (target: <= nginx's)",
            100.0 * c / n
        );
    }
    if let Some(r) = http("chaperone", "cpu_vs_nginx_paired") {
        println!(
            "  CPU per request, back-to-back rounds: chaperone = {:.0}% of nginx's   (target: <= 100%)",
            100.0 * r
        );
    }
    if let (Some(n), Some(c)) = (http("nginx", "rps_c16"), http("chaperone", "rps_c16")) {
        println!(
            "  throughput at 16 connections: chaperone {c:.0} req/s = {:.0}% of nginx's {n:.0}   (target: >= 100%)",
            100.0 * c / n
        );
    }
    // What agents do (http_bench's scenarios), chaperone next to nginx.
    let scenarios = summary
        .find("\"scenarios\"")
        .map_or("", |at| &summary[at..]);
    let scenario = |who: &str, key: &str| json_number_after(scenarios, &format!("\"{who}\""), key);
    for (label, key, unit, target) in [
        ("list of 500 pods, p50", "list_500_pods_p50_us", "us", ""),
        (
            "the same list masked, p50",
            "list_500_pods_masked_p50_us",
            "us",
            "",
        ),
        (
            "create through the write-ahead log, p50",
            "create_p50_us",
            "us",
            "(target: added <= 1000 us)",
        ),
        ("watch, 1,000 events", "watch_1000_events_ms", "ms", ""),
        (
            "watch, 1,000 events masked",
            "watch_1000_events_masked_ms",
            "ms",
            "",
        ),
        ("exec stdout", "exec_mb_per_s", "MB/s", ""),
        (
            "exec stdout masked",
            "exec_masked_mb_per_s",
            "MB/s",
            "(target: >= 200 MB/s)",
        ),
        (
            "memory per idle watch",
            "idle_watch_kib",
            "KiB",
            "(target: <= 32 KiB)",
        ),
    ] {
        println!(
            "  {label}: chaperone {}, nginx {}, direct {}   {target}",
            show(scenario("chaperone", key), unit),
            show(scenario("nginx", key), unit),
            show(scenario("direct", key), unit),
        );
    }
    println!(
        "  gateway RSS after the HTTP runs: {}",
        show(http("chaperone", "rss_kib").map(|k| k / 1024.0), "MiB")
    );
    for id in [
        "decide/match_near_end/1000",
        "decide/no_match/1000",
        "decide/exec_no_match/1000",
        "decide_identity/match_near_end/1000",
        "decide_identity/no_match/1000",
        "decide_identity/same_shape_match_last/1000",
    ] {
        println!(
            "  policy {id}: {}   (target: <= 2 us)",
            show(
                criterion_figure(target, id).map(|(ns, _)| ns / 1000.0),
                "us"
            )
        );
    }
    let latency = read("policy_latency.txt");
    for (id, target_us) in [
        ("decide/match_near_end/1000", 2),
        ("decide/no_match/1000", 2),
        ("decide_exec/exec_selectors/1000", 2),
        ("decide_cel/condition_true/1000", 20),
        ("decide_cel/condition_false/1000", 20),
    ] {
        println!(
            "  policy {id} p99: {}   (target: <= {target_us} us)",
            show(percentile_us(&latency, id, "p99"), "us")
        );
    }
    for (id, dir) in [
        ("masking/secret_list_10MiB", "masking/secret_list_10MiB"),
        (
            "masking/configmap_list_10MiB",
            "masking/configmap_list_10MiB",
        ),
        ("masking/pod_list_10MiB", "masking/pod_list_10MiB"),
        (
            "masking/secret_watch_10MiB_16KiB_chunks",
            "masking/secret_watch_10MiB_16KiB_chunks",
        ),
    ] {
        println!(
            "  {id}: {}   (target: >= 200 MB/s per core)",
            show(criterion_mb_per_s(target, dir), "MB/s")
        );
    }
    for id in [
        "recorder/encode_write_100k_rows_single_thread",
        "recorder/pipeline_100k_rows_record_to_published_file",
    ] {
        let rate = criterion_figure(target, id).and_then(|(ns, rows)| rows.map(|r| r / (ns / 1e9)));
        println!(
            "  {id}: {}   (target: >= 200k rows/s)",
            rate.map_or("n/a".to_owned(), |r| format!("{:.0}k rows/s", r / 1000.0))
        );
    }
    let median_us = |id: &str| criterion_figure(target, id).map(|(ns, _)| ns / 1000.0);
    println!(
        "  mutation latency added by the write-ahead log (one append + fsync, median): {}; the disk's own pwrite + fdatasync: {}   (target: p50 <= 1000 us)",
        show(median_us("wal/begin_one_append_fsync"), "us"),
        show(median_us("wal/disk_baseline_pwrite_fdatasync"), "us")
    );
    println!(
        "  write-ahead log, 16 concurrent mutations (group commit): {} per batch",
        show(median_us("wal/begin_16_concurrent_group_commit"), "us")
    );
    // Criterion keeps `group/a/b` under `group/a_b/`.
    for (id, dir) in [
        (
            "exec_recording/tap/masked_recorded",
            "exec_recording/tap_masked_recorded",
        ),
        (
            "exec_recording/parquet/exec_frames",
            "exec_recording/parquet_exec_frames",
        ),
    ] {
        println!(
            "  {id}: {}   (target: >= 200 MB/s per core)",
            show(criterion_mb_per_s(target, dir), "MB/s")
        );
    }
    println!(
        "  connect() added by the eBPF redirect (median): {}   (target: <= 5 us)",
        show(json_number_after(&connect, "{", "added_median_us"), "us")
    );
}
