//! The "container runtime" behind exec and attach: real host processes.
//!
//! An exec runs the requested command on the host with the pod's private temporary
//! directory as its working directory, so `kubectl exec -- sh -c ...` and `kubectl cp`
//! (tar underneath) really work. There is no pty: with `tty=true` the process still gets
//! pipes, and its standard error is merged into standard output as a terminal would show
//! it; resize messages are accepted and ignored. Attach runs `cat` (an echo "container"):
//! what the client types comes back on stdout, and the session ends when the client
//! closes stdin (`shared/k8s-wire-reference.md` sections 7 and 8).

use std::{path::Path, process::Stdio};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    process::Command,
    sync::mpsc,
};

/// What to run and which streams the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExecSpec {
    /// argv; empty for attach.
    pub command: Vec<String>,
    /// The client sends stdin.
    pub stdin: bool,
    /// The client wants stdout.
    pub stdout: bool,
    /// The client wants stderr.
    pub stderr: bool,
    /// A terminal was requested.
    pub tty: bool,
}

impl ExecSpec {
    /// Reads `command`, `stdin`, `stdout`, `stderr` and `tty` from a query string.
    pub fn from_query(query: Option<&str>) -> ExecSpec {
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let flag = |name: &str| {
            super::go_bool(
                pairs
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str()),
            )
        };
        ExecSpec {
            command: pairs
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect(),
            stdin: flag("stdin"),
            stdout: flag("stdout"),
            stderr: flag("stderr"),
            tty: flag("tty"),
        }
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutStream {
    /// Standard output (and, with a TTY, standard error).
    Stdout,
    /// Standard error (no TTY only).
    Stderr,
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Exit code 0.
    Success,
    /// A non-zero exit code (a signal counts as 128 + signal number).
    ExitCode(i32),
    /// The process could not be started.
    Failed(String),
}

impl Outcome {
    /// The error-channel Status of the v4/v5 protocols (section 7.4).
    pub fn status(&self, command: &[String]) -> Value {
        match self {
            Outcome::Success => json!({"metadata": {}, "status": "Success"}),
            Outcome::ExitCode(code) => json!({
                "metadata": {},
                "status": "Failure",
                "message": format!(
                    "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                    command.join(" ")
                ),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Outcome::Failed(message) => json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "InternalError",
                "code": 500,
            }),
        }
    }

    /// The error-channel text of the v1-v3 protocols: empty on success.
    pub fn text(&self, command: &[String]) -> String {
        match self {
            Outcome::Success => String::new(),
            Outcome::ExitCode(code) => format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            ),
            Outcome::Failed(message) => message.clone(),
        }
    }
}

async fn pump_output<R: AsyncRead + Unpin>(
    mut from: R,
    stream: OutStream,
    out: mpsc::UnboundedSender<(OutStream, Bytes)>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out
                    .send((stream, Bytes::copy_from_slice(&buf[..n])))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Runs `spec.command` in `cwd`: `stdin` chunks go to the process (the channel closing is
/// EOF), output chunks go to `out`. Returns once the process exited and its output was
/// fully read.
pub(crate) async fn run(
    spec: &ExecSpec,
    cwd: &Path,
    stdin: Option<mpsc::UnboundedReceiver<Bytes>>,
    out: mpsc::UnboundedSender<(OutStream, Bytes)>,
) -> Outcome {
    let Some((program, args)) = spec.command.split_first() else {
        return Outcome::Failed("Internal error occurred: no command given".to_owned());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed(format!(
                "Internal error occurred: error executing command in container: failed to exec in container: starting container process caused: exec: \"{program}\": {e}"
            ));
        }
    };
    let stdin_task = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(mut rx)) => Some(tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if pipe.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            // Dropping the pipe is the EOF the process waits for.
            drop(pipe);
        })),
        _ => None,
    };
    let discard = |wanted: bool, stream: OutStream| {
        if wanted { Some(stream) } else { None }
    };
    let stdout_to = discard(spec.stdout, OutStream::Stdout);
    // A terminal shows both streams on one.
    let stderr_to = if spec.tty {
        discard(spec.stdout, OutStream::Stdout)
    } else {
        discard(spec.stderr, OutStream::Stderr)
    };
    let (sink_tx, mut sink_rx) = mpsc::unbounded_channel::<(OutStream, Bytes)>();
    let mut readers = Vec::new();
    if let Some(o) = child.stdout.take() {
        readers.push(tokio::spawn(pump_output(
            o,
            OutStream::Stdout,
            sink_tx.clone(),
        )));
    }
    if let Some(e) = child.stderr.take() {
        readers.push(tokio::spawn(pump_output(
            e,
            OutStream::Stderr,
            sink_tx.clone(),
        )));
    }
    drop(sink_tx);
    while let Some((stream, bytes)) = sink_rx.recv().await {
        let target = match stream {
            OutStream::Stdout => stdout_to,
            OutStream::Stderr => stderr_to,
        };
        if let Some(t) = target {
            let _ = out.send((t, bytes));
        }
    }
    for r in readers {
        let _ = r.await;
    }
    let status = child.wait().await;
    if let Some(t) = stdin_task {
        t.abort();
    }
    match status {
        Ok(s) if s.success() => Outcome::Success,
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt as _;
            Outcome::ExitCode(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)))
        }
        Err(e) => Outcome::Failed(format!(
            "Internal error occurred: waiting for the command: {e}"
        )),
    }
}
