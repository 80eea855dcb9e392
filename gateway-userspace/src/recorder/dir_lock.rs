//! One gateway per recording directory.
//!
//! Two gateways writing one `recording.dir` would interleave its write-ahead log, its
//! manifest chain and its record of used `once` approvals: the evidence would no longer
//! verify, and an approval could be used once on each. That happens when a DaemonSet is
//! rolled with `maxSurge` (the new pod starts while the old one drains), or when two
//! DaemonSets point at one host path. The gateway takes an exclusive `flock(2)` on
//! `<dir>/.lock` before it opens anything else there; the kernel drops it when the process
//! exits, however it exits, so a crashed gateway never leaves a stale lock. A second
//! gateway waits for the first to finish draining, then refuses to start, naming the
//! holder (the lock file says which node, pod and process took it).

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{self, Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use super::durable;

/// The lock's file name in the recording directory (a dot file: the uploader and the
/// readers skip it).
pub const LOCK_FILE: &str = ".lock";

/// How often a waiting gateway tries the lock again.
const RETRY: Duration = Duration::from_millis(200);

/// The exclusive hold on a recording directory; released when dropped (or when the
/// process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Why the recording directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    /// The lock file cannot be created, read or written, or the lock call failed.
    #[error("{path}: {source}")]
    Io {
        /// The lock file (or the directory).
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another process holds the lock.
    #[error(
        "{dir} is in use by another gateway ({holder}), still after {waited:?}: one recording directory takes one gateway (their write-ahead logs, manifests and used-approval records would interleave); let the other stop first (a DaemonSet rolled with maxSurge starts the new pod before the old one ends)"
    )]
    InUse {
        /// The recording directory.
        dir: PathBuf,
        /// What the holder wrote into the lock file.
        holder: String,
        /// How long this gateway waited.
        waited: Duration,
    },
}

/// Locks `dir` (creating it) for this process, waiting up to `wait` for another holder to
/// let go; `holder` (which node, pod and process) is written into the lock file for the
/// message of the next one that tries.
pub async fn lock_dir(dir: &Path, wait: Duration, holder: &str) -> Result<DirLock, DirLockError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DirLockError::Io { path, source }
    };
    durable::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    let started = tokio::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {
                let holder = current_holder(&mut file);
                if started.elapsed() >= wait {
                    return Err(DirLockError::InUse {
                        dir: dir.to_path_buf(),
                        holder,
                        waited: wait,
                    });
                }
                if started.elapsed() < RETRY {
                    tracing::warn!(
                        dir = %dir.display(),
                        %holder,
                        wait_s = wait.as_secs_f64(),
                        "the recording directory is locked by another gateway; waiting for it to stop"
                    );
                }
                tokio::time::sleep(RETRY).await;
            }
            Err(TryLockError::Error(e)) => {
                // ENOLCK: a network filesystem without lock support.
                return Err(io_err(&path)(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot lock it ({e}); recording.dir must be on a filesystem with flock(2) locks, a node's local disk"
                    ),
                )));
            }
        }
    }
    let note = format!("{}\n", holder.trim());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(note.as_bytes()))
        .map_err(io_err(&path))?;
    Ok(DirLock { _file: file })
}

/// What the current holder wrote into the lock file (at most a line of it).
fn current_holder(file: &mut File) -> String {
    let mut text = String::new();
    let read = file
        .rewind()
        .and_then(|()| (&*file).take(200).read_to_string(&mut text));
    match read {
        Ok(_) if !text.trim().is_empty() => text.lines().next().unwrap_or_default().to_owned(),
        _ => "a process that did not say which".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_gateway_waits_for_the_first_then_refuses_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let recording = dir.path().join("recording");
        let first = lock_dir(
            &recording,
            Duration::ZERO,
            "node n1, pod chaperone-abc, pid 1",
        )
        .await
        .unwrap();
        let err = lock_dir(
            &recording,
            Duration::from_millis(300),
            "node n1, pod chaperone-def, pid 1",
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, DirLockError::InUse { .. })
                && text.contains("in use by another gateway (node n1, pod chaperone-abc, pid 1)"),
            "{text}"
        );
        // Let go while the next one waits: it gets the lock.
        let next = tokio::spawn({
            let recording = recording.clone();
            async move { lock_dir(&recording, Duration::from_secs(30), "the next").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(first);
        next.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_lock_file_left_behind_is_no_lock() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "pid 1 on gone\n").unwrap();
        let lock = lock_dir(dir.path(), Duration::ZERO, "node n2, pod p, pid 7")
            .await
            .unwrap();
        let note = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(note, "node n2, pod p, pid 7\n");
        drop(lock);
    }
}
