//! The `once` approvals this node has let a request through on, kept on the node's disk.
//!
//! A `once` approval is marked used in its AccessRequest's status (the `Consumed`
//! condition), which any gateway reads. The status is outside the seal, though: whoever
//! may write `accessrequests/status` can put the approved status back without the mark,
//! seal and all, and the approval would let a second request through. A `once` approval
//! of an identified caller can only ever be used on the node its pod runs on (the pod's
//! uid is part of the request's fingerprint), so this node's own record of what it used
//! closes that, across restarts too. The gateway writes the record, and syncs it, before
//! the request goes on; when it cannot, the request is refused.
//!
//! The file holds one line per used AccessRequest, `<uid> <forget-after>\n`, the second an
//! RFC 3339 time after which the approval is unusable anyway and the line is dropped the
//! next time the file is opened.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::recorder::durable;

/// Where the record is kept, under the recording directory (`recording.dir`, a host path
/// in the DaemonSet); a dot directory, which the uploader and readers skip.
pub const USED_LOG_PATH: &str = ".approvals/used";

/// The record of used `once` approvals (see the module documentation).
#[derive(Debug)]
pub struct UsedLog {
    path: PathBuf,
    /// Held across the disk's write and sync: only [`UsedLog::record`] takes it.
    file: Mutex<Appender>,
    /// Never held across I/O: [`UsedLog::contains`] runs on the async threads.
    used: Mutex<HashMap<String, jiff::Timestamp>>,
}

#[derive(Debug)]
struct Appender {
    file: File,
    /// A failed append could not be cut off again: the file's end is unknown, so no
    /// more lines are written to it (every later use is refused) until a restart.
    broken: bool,
}

/// Why the record cannot be opened: the gateway does not start (it could not keep a
/// `once` approval to one use).
#[derive(Debug, thiserror::Error)]
pub enum UsedLogError {
    /// Reading, writing or creating the file or its directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A complete line is not `<uid> <time>`.
    #[error(
        "{path}:{line}: not a used-approval record (expected '<uid> <RFC 3339 time>'); the file is written only by the gateway, delete it to start afresh"
    )]
    Garbage {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

impl UsedLog {
    /// Opens (or creates) the record at `path`, dropping lines whose time has passed by
    /// `now`. A last line without its newline (a write cut off by a crash, whose request
    /// never went on) is dropped too.
    pub fn open(path: &Path, now: jiff::Timestamp) -> Result<Arc<Self>, UsedLogError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| UsedLogError::Io { path, source }
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        durable::create_dir_all(dir).map_err(io_err(dir))?;
        // A device or pipe in its place would never end a read (`/dev/zero`) or keep no
        // record at all (`/dev/null`, every `once` approval reusable after a restart); a
        // link could point anywhere, a tmpfs included. The gateway writes a plain file.
        if fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(io_err(path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let text = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(path)(e)),
        };
        let complete = text
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |end| end + 1);
        let mut used = HashMap::new();
        let mut stale = complete != text.len();
        for (i, line) in text[..complete].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let Some((uid, until)) = parse_line(line) else {
                return Err(UsedLogError::Garbage {
                    path: path.to_path_buf(),
                    line: i + 1,
                });
            };
            if until > now {
                used.insert(uid.to_owned(), until);
            } else {
                stale = true;
            }
        }
        if stale {
            rewrite(path, &used).map_err(io_err(path))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        if text.is_empty() {
            durable::sync_dir(dir).map_err(io_err(dir))?;
        }
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            file: Mutex::new(Appender {
                file,
                broken: false,
            }),
            used: Mutex::new(used),
        }))
    }

    /// Whether the AccessRequest with `uid` has let a request through on this node.
    pub fn contains(&self, uid: &str) -> bool {
        lock(&self.used).contains_key(uid)
    }

    /// Records that the AccessRequest with `uid` lets a request through now, durably,
    /// before it goes on. `Ok(false)`: it was recorded already (used before). Blocks on
    /// the disk: call it off the async threads.
    pub fn record(&self, uid: &str, forget_after: jiff::Timestamp) -> io::Result<bool> {
        if uid.is_empty()
            || uid
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{uid:?} is not an AccessRequest uid"),
            ));
        }
        let mut appender = lock(&self.file);
        if self.contains(uid) {
            return Ok(false);
        }
        if appender.broken {
            return Err(io::Error::other(
                "an earlier write to the record failed and could not be undone",
            ));
        }
        let end = appender.file.metadata()?.len();
        let line = format!("{uid} {forget_after}\n");
        let written = appender
            .file
            .write_all(line.as_bytes())
            .and_then(|()| appender.file.sync_data());
        if let Err(e) = written {
            // A part of the line would run into the next one: cut it off.
            if appender.file.set_len(end).is_err() {
                appender.broken = true;
            }
            return Err(e);
        }
        lock(&self.used).insert(uid.to_owned(), forget_after);
        Ok(true)
    }

    /// Where the record is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn parse_line(line: &[u8]) -> Option<(&str, jiff::Timestamp)> {
    let line = std::str::from_utf8(line).ok()?;
    let (uid, until) = line.split_once(' ')?;
    if uid.is_empty() {
        return None;
    }
    Some((uid, until.parse().ok()?))
}

/// Replaces the file with `used`'s lines: written beside it, synced, renamed over it.
fn rewrite(path: &Path, used: &HashMap<String, jiff::Timestamp>) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    for (uid, until) in used {
        writeln!(file, "{uid} {until}")?;
    }
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    durable::sync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_recorded_use_survives_a_reopen_until_its_time_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/used");
        let log = UsedLog::open(&path, at("2026-12-05T10:00:00Z")).unwrap();
        assert!(!log.contains("uid-1"));
        assert!(log.record("uid-1", at("2026-12-06T10:00:00Z")).unwrap());
        assert!(log.record("uid-2", at("2026-12-05T11:00:00Z")).unwrap());
        assert!(
            !log.record("uid-1", at("2026-12-06T10:00:00Z")).unwrap(),
            "used before"
        );
        assert!(log.contains("uid-1"));
        drop(log);
        let reopened = UsedLog::open(&path, at("2026-12-05T10:30:00Z")).unwrap();
        assert!(reopened.contains("uid-1") && reopened.contains("uid-2"));
        drop(reopened);
        // Past uid-2's time: dropped, and the file is rewritten without it.
        let later = UsedLog::open(&path, at("2026-12-05T12:00:00Z")).unwrap();
        assert!(later.contains("uid-1") && !later.contains("uid-2"));
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, "uid-1 2026-12-06T10:00:00Z\n");
    }

    #[test]
    fn a_cut_off_last_line_is_dropped_and_garbage_is_refused_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("used");
        fs::write(&path, "uid-1 2026-12-06T10:00:00Z\nuid-2 2026-12-0").unwrap();
        let log = UsedLog::open(&path, at("2026-12-05T10:00:00Z")).unwrap();
        assert!(log.contains("uid-1") && !log.contains("uid-2"));
        assert!(log.record("uid-3", at("2026-12-06T10:00:00Z")).unwrap());
        drop(log);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "uid-1 2026-12-06T10:00:00Z\nuid-3 2026-12-06T10:00:00Z\n",
            "the cut-off line is gone and new lines start on their own"
        );
        fs::write(&path, "uid-1 2026-12-06T10:00:00Z\nnot a record\n").unwrap();
        let err = UsedLog::open(&path, at("2026-12-05T10:00:00Z")).unwrap_err();
        assert!(
            matches!(err, UsedLogError::Garbage { line: 2, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(":2: not a used-approval record"),
            "{err}"
        );
    }

    /// A use whose record cannot be written is not counted as recorded (the holder then
    /// refuses the request); when the half-written line cannot be cut off either, every
    /// later use is refused until a restart, which starts from what the file holds.
    #[test]
    fn a_write_that_fails_records_nothing_and_one_that_cannot_be_undone_stops_all_uses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("used");
        let log = UsedLog::open(&path, at("2026-12-05T10:00:00Z")).unwrap();
        assert!(log.record("uid-1", at("2026-12-06T10:00:00Z")).unwrap());
        // A descriptor that can neither write nor truncate: the append fails, and so does
        // cutting it back.
        lock(&log.file).file = File::open(&path).unwrap();
        assert!(log.record("uid-2", at("2026-12-06T10:00:00Z")).is_err());
        assert!(!log.contains("uid-2"), "a failed write is no record");
        assert!(lock(&log.file).broken);
        let err = log.record("uid-3", at("2026-12-06T10:00:00Z")).unwrap_err();
        assert!(err.to_string().contains("could not be undone"), "{err}");
        assert!(log.contains("uid-1") && !log.contains("uid-3"));
        drop(log);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "uid-1 2026-12-06T10:00:00Z\n"
        );
        let reopened = UsedLog::open(&path, at("2026-12-05T10:00:00Z")).unwrap();
        assert!(
            reopened
                .record("uid-2", at("2026-12-06T10:00:00Z"))
                .unwrap()
        );
    }

    #[test]
    fn a_device_in_the_records_place_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for device in ["/dev/null", "/dev/zero"] {
            let path = dir.path().join(device.trim_start_matches("/dev/"));
            std::os::unix::fs::symlink(device, &path).unwrap();
            let err = UsedLog::open(&path, at("2026-12-05T10:00:00Z")).unwrap_err();
            assert!(err.to_string().ends_with(": not a regular file"), "{err}");
        }
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &dangling).unwrap();
        assert!(UsedLog::open(&dangling, at("2026-12-05T10:00:00Z")).is_err());
        assert!(
            !dir.path().join("elsewhere").exists(),
            "the link's target was created"
        );
    }

    #[test]
    fn uids_that_would_break_a_line_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = UsedLog::open(&dir.path().join("used"), at("2026-12-05T10:00:00Z")).unwrap();
        for bad in ["", "a b", "a\nb"] {
            assert!(
                log.record(bad, at("2026-12-06T10:00:00Z")).is_err(),
                "{bad:?}"
            );
        }
    }
}
