//! Directory entries that survive a power loss.
//!
//! A file's `fsync` makes its contents durable, not its name: the entry lives in the
//! directory, which must be synced too, and so must the entries of directories created
//! on the way to it. Without that, a crash right after a new day's partition directory
//! (or the manifest's directory) was created can lose the directory and every file
//! synced into it, while the write-ahead log already counted them as recorded.

use std::{
    fs::{self, File},
    io,
    path::Path,
};

/// Syncs `dir`'s own entries (the names created, renamed or removed in it).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `fs::create_dir_all`, then syncs the parent of every directory it created, deepest
/// last, so each new name is durable before anything is written under it. Does nothing
/// more when `dir` already exists.
pub(crate) fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    // The ancestors that are missing now, outermost first.
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.is_dir())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let synced = fs::create_dir_all(dir).and_then(|()| {
        missing.iter().try_for_each(|created| {
            let parent = match created.parent() {
                Some(p) if p.as_os_str().is_empty() => Path::new("."),
                Some(p) => p,
                None => return Ok(()),
            };
            sync_dir(parent)
        })
    });
    if synced.is_err() {
        // Take the new (still empty) directories away again, deepest first, so the next
        // call creates and syncs them rather than finding them and trusting them (also
        // when creating failed halfway).
        for created in missing.iter().rev() {
            let _ = fs::remove_dir(created);
        }
    }
    synced
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_every_missing_level_and_tolerates_an_existing_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let deep = tmp.path().join("table=requests/date=2026-12-05/node=n1");
        create_dir_all(&deep).expect("create");
        assert!(deep.is_dir());
        create_dir_all(&deep).expect("again");
        let sibling = tmp.path().join("table=requests/date=2026-12-06/node=n1");
        create_dir_all(&sibling).expect("sibling");
        assert!(sibling.is_dir());
    }

    #[test]
    fn a_file_in_the_way_is_an_error_naming_nothing_created() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("table=requests");
        fs::write(&file, b"not a directory").expect("write");
        let err = create_dir_all(&file.join("date=2026-12-05")).expect_err("a file in the way");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::NotADirectory | io::ErrorKind::AlreadyExists
            ),
            "{err:?}"
        );
    }
}
