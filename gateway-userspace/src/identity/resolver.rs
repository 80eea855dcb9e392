//! cgroup id → cgroup path, by scanning the cgroup2 hierarchy.
//!
//! The kernel reports `bpf_get_current_cgroup_id()`, which is the inode number of the cgroup's
//! directory in the cgroup2 filesystem. There is no syscall to go from the id back to a path
//! (short of `open_by_handle_at`, which needs `CAP_DAC_READ_SEARCH` and unsafe code), so the
//! resolver walks the hierarchy and keeps a map. Kernfs ids are 64-bit and never reused, so a
//! cached entry can only go stale by the cgroup being removed; a hit is re-checked with one
//! `stat` so a removed cgroup stops resolving at once. A miss triggers a rescan, at most one
//! per `min_rescan_interval`, so a flood of unknown ids cannot keep the resolver scanning.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Mutex, RwLock},
    time::{Duration, Instant},
};

use super::IdentityError;

/// Limits on a scan of the cgroup2 hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverLimits {
    /// The shortest time between two scans caused by misses.
    pub min_rescan_interval: Duration,
    /// Directories deeper than this below the mount are not visited.
    pub max_depth: usize,
    /// A scan stops after this many cgroups (a node has a few thousand).
    pub max_entries: usize,
}

impl Default for ResolverLimits {
    fn default() -> Self {
        Self {
            min_rescan_interval: Duration::from_millis(500),
            max_depth: 16,
            max_entries: 200_000,
        }
    }
}

/// Counters for the metrics endpoint and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResolverStats {
    /// Completed scans.
    pub scans: u64,
    /// Misses that could not rescan because of the rate limit.
    pub rate_limited: u64,
    /// cgroups found by the last scan.
    pub entries: usize,
    /// Misses resolved by opening the cgroup by its id, without a scan.
    pub opened_by_id: u64,
}

/// Maps cgroup ids to paths relative to the cgroup2 mount (`kubepods.slice/...`, no
/// leading slash).
#[derive(Debug)]
pub struct CgroupResolver {
    root: PathBuf,
    limits: ResolverLimits,
    paths: RwLock<HashMap<u64, String>>,
    scan: Mutex<ScanState>,
}

#[derive(Debug, Default)]
struct ScanState {
    last: Option<Instant>,
    stats: ResolverStats,
}

impl CgroupResolver {
    /// A resolver over the cgroup2 mount at `root`; it scans lazily on the first lookup.
    pub fn new(root: PathBuf, limits: ResolverLimits) -> Self {
        Self {
            root,
            limits,
            paths: RwLock::new(HashMap::new()),
            scan: Mutex::new(ScanState::default()),
        }
    }

    /// A resolver over this host's cgroup2 mount (from /proc/self/mountinfo).
    pub fn for_host(limits: ResolverLimits) -> Result<Self, IdentityError> {
        let root =
            crate::ebpf::cgroup2_mount().map_err(|e| IdentityError::Cgroup2Mount(e.to_string()))?;
        Ok(Self::new(root, limits))
    }

    /// The cgroup2 mount point this resolver scans.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of cgroup `id` relative to the mount, rescanning on a miss when the rate
    /// limit allows. Blocking (a `stat`, and on a miss possibly a directory walk).
    pub fn resolve(&self, id: u64) -> Option<String> {
        if let Some(path) = self.cached(id) {
            return Some(path);
        }
        // A new cgroup (a pod's first connection): open it by its id, which costs a few
        // system calls whatever the size of the tree, and is not rate-limited.
        if let Some(path) = path_by_id(&self.root, id, self.limits.max_depth) {
            self.paths
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id, path.clone());
            self.scan
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .stats
                .opened_by_id += 1;
            return Some(path);
        }
        if self.rescan_if_allowed() {
            return self.cached(id);
        }
        None
    }

    /// Scan counters.
    pub fn stats(&self) -> ResolverStats {
        self.scan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stats
    }

    /// Every cgroup id the last scan found, with its path.
    pub fn known(&self) -> Vec<(u64, String)> {
        self.paths
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(id, path)| (*id, path.clone()))
            .collect()
    }

    /// Rescans now, regardless of the rate limit (for the periodic refresh).
    pub fn rescan(&self) -> Result<usize, IdentityError> {
        let mut state = self
            .scan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.scan_locked(&mut state)
    }

    fn cached(&self, id: u64) -> Option<String> {
        let path = self
            .paths
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned()?;
        // The cgroup may have been removed since the scan; ids are never reused, so a
        // directory with the same inode is the same cgroup.
        match std::fs::symlink_metadata(self.root.join(&path)) {
            Ok(meta) if meta.ino() == id => Some(path),
            _ => {
                self.paths
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                None
            }
        }
    }

    fn rescan_if_allowed(&self) -> bool {
        let mut state = self
            .scan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(last) = state.last
            && last.elapsed() < self.limits.min_rescan_interval
        {
            state.stats.rate_limited += 1;
            return false;
        }
        match self.scan_locked(&mut state) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cgroup rescan failed");
                false
            }
        }
    }

    fn scan_locked(&self, state: &mut ScanState) -> Result<usize, IdentityError> {
        state.last = Some(Instant::now());
        let found = scan(&self.root, self.limits)?;
        let entries = found.len();
        *self
            .paths
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = found;
        state.stats.scans += 1;
        state.stats.entries = entries;
        Ok(entries)
    }
}

/// The path (relative to `root`) of the cgroup whose id is `id`, found without walking the
/// tree: on cgroup2 a file handle is the kernfs node id, which is the cgroup id the kernel
/// reports, so `open_by_handle_at` opens the cgroup's directory and `/proc/self/fd` names
/// it. `None` when the id is unknown, the filesystem is not cgroup2 (a plain directory
/// has other handles), the cgroup is outside `root` or deeper than a scan would go
/// (`max_depth`), or the process lacks `CAP_DAC_READ_SEARCH`: the caller then scans.
#[expect(
    unsafe_code,
    reason = "open_by_handle_at has no safe wrapper in nix or std"
)]
fn path_by_id(root: &Path, id: u64, max_depth: usize) -> Option<String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    /// `struct file_handle` with room for a kernfs handle (`FILEID_KERNFS`: the 8-byte
    /// node id).
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: libc::c_uint,
        handle_type: libc::c_int,
        id: [u8; 8],
    }
    const FILEID_KERNFS: libc::c_int = 0xfe;
    let mount = std::fs::File::open(root).ok()?;
    let mut handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id: id.to_ne_bytes(),
    };
    // SAFETY: `handle` is a `struct file_handle` whose `handle_bytes` (8) is the size of
    // the array after its header, as the call requires; `mount` is an open fd on the
    // filesystem the handle belongs to. The returned fd, if any, is owned here.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&raw mut handle).cast(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let rel = target.strip_prefix(root).ok()?.to_str()?.to_owned();
    if !rel.is_empty() && rel.split('/').count() > max_depth {
        return None;
    }
    // The same check as a cached entry's: ids are never reused, so a directory with this
    // inode at this path is this cgroup.
    let meta = std::fs::symlink_metadata(root.join(&rel)).ok()?;
    (meta.ino() == id && meta.is_dir()).then_some(rel)
}

/// Walks the hierarchy below `root` (depth-first, without following symlinks).
fn scan(root: &Path, limits: ResolverLimits) -> Result<HashMap<u64, String>, IdentityError> {
    let meta = std::fs::symlink_metadata(root).map_err(|source| IdentityError::Io {
        path: root.to_owned(),
        source,
    })?;
    let mut found = HashMap::new();
    found.insert(meta.ino(), String::new());
    let mut stack: Vec<(PathBuf, String, usize)> = vec![(root.to_owned(), String::new(), 0)];
    while let Some((dir, rel, depth)) = stack.pop() {
        if depth >= limits.max_depth {
            continue;
        }
        // A cgroup removed while we walk is not an error.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if !file_type.is_dir() {
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            found.insert(meta.ino(), child_rel.clone());
            if found.len() >= limits.max_entries {
                tracing::warn!(
                    max = limits.max_entries,
                    "cgroup scan stopped at its entry limit"
                );
                return Ok(found);
            }
            stack.push((entry.path(), child_rel, depth + 1));
        }
    }
    Ok(found)
}

/// A cgroup tree made with mkdir under the real cgroup2 mount, removed on drop (tests).
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    /// The host's cgroup2 mount, or `None` (with the reason printed) when the test cannot
    /// create cgroups here; panics instead when `CI` is set.
    pub(crate) fn cgroup2_for_tests(test: &str) -> Option<PathBuf> {
        let skip = |reason: String| {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: cannot run in CI: {reason}"
            );
            eprintln!("skipping {test}: {reason}");
            None
        };
        if !nix::unistd::Uid::effective().is_root() {
            return skip("needs root to create cgroups".to_owned());
        }
        match crate::ebpf::cgroup2_mount() {
            Ok(root) => Some(root),
            Err(e) => skip(format!("no cgroup2 mount: {e}")),
        }
    }

    /// A unique directory in the cgroup2 mount; every cgroup made through it is removed on
    /// drop, children first.
    pub(crate) struct TestTree {
        pub(crate) root: PathBuf,
        pub(crate) base: PathBuf,
        made: Vec<PathBuf>,
    }

    impl TestTree {
        pub(crate) fn new(root: &Path, name: &str) -> Self {
            let base = root.join(format!("chaperone-test-{name}-{}", uuid::Uuid::now_v7()));
            std::fs::create_dir(&base).unwrap_or_else(|e| panic!("mkdir {}: {e}", base.display()));
            Self {
                root: root.to_owned(),
                base: base.clone(),
                made: vec![base],
            }
        }

        /// Creates `rel` (and its parents) below the base; returns the cgroup id and the path
        /// relative to the mount.
        pub(crate) fn mkdir(&mut self, rel: &str) -> (u64, String) {
            use std::os::unix::fs::MetadataExt as _;
            let mut dir = self.base.clone();
            for part in rel.split('/') {
                dir.push(part);
                if !dir.exists() {
                    std::fs::create_dir(&dir)
                        .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                    self.made.push(dir.clone());
                }
            }
            let ino = std::fs::metadata(&dir)
                .unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()))
                .ino();
            let rel_to_mount = dir
                .strip_prefix(&self.root)
                .unwrap_or_else(|e| panic!("{e}"))
                .to_string_lossy()
                .into_owned();
            (ino, rel_to_mount)
        }

        /// Removes one cgroup (it must have no children).
        pub(crate) fn rmdir(&mut self, rel_to_mount: &str) {
            let dir = self.root.join(rel_to_mount);
            std::fs::remove_dir(&dir).unwrap_or_else(|e| panic!("rmdir {}: {e}", dir.display()));
            self.made.retain(|d| d != &dir);
        }
    }

    impl Drop for TestTree {
        fn drop(&mut self) {
            for dir in self.made.iter().rev() {
                if let Err(e) = std::fs::remove_dir(dir) {
                    eprintln!("cleanup: rmdir {}: {e}", dir.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    const UID: &str = "1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b";
    const ID: &str = "feedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedface";

    fn no_rate_limit() -> ResolverLimits {
        ResolverLimits {
            min_rescan_interval: Duration::ZERO,
            ..ResolverLimits::default()
        }
    }

    #[test]
    fn resolves_real_cgroups_in_both_driver_layouts_and_follows_churn() {
        let Some(root) = cgroup2_for_tests("resolver churn") else {
            return;
        };
        let uid_ = UID.replace('-', "_");
        let mut tree = TestTree::new(&root, "resolver");
        let systemd = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
        );
        let cgroupfs = format!("kubepods/besteffort/pod{UID}/{ID}");
        let (systemd_id, systemd_path) = tree.mkdir(&systemd);
        let (cgroupfs_id, cgroupfs_path) = tree.mkdir(&cgroupfs);

        let resolver = CgroupResolver::new(root.clone(), no_rate_limit());
        for (id, path) in [(systemd_id, &systemd_path), (cgroupfs_id, &cgroupfs_path)] {
            let got = resolver
                .resolve(id)
                .unwrap_or_else(|| panic!("cgroup {id} ({path}) did not resolve"));
            assert_eq!(&got, path);
            let parsed = super::super::cgroup::parse_pod_cgroup(&got)
                .unwrap_or_else(|| panic!("{got} does not parse as a pod cgroup"));
            assert_eq!(parsed.pod_uid, UID);
            assert_eq!(parsed.container_id(), Some(ID));
        }
        // Both were opened by their ids: no walk of the host's cgroup tree.
        let stats = resolver.stats();
        assert_eq!((stats.scans, stats.opened_by_id), (0, 2), "{stats:?}");
        // Hits do not rescan.
        resolver.resolve(systemd_id);
        assert_eq!(resolver.stats(), stats, "a hit must cost nothing more");

        // A container created later resolves by its id too, however recent the last miss.
        let (late_id, late_path) = tree.mkdir(&format!("kubepods/pod{UID}/{}", "ab".repeat(32)));
        assert_eq!(
            resolver.resolve(late_id).as_deref(),
            Some(late_path.as_str())
        );
        assert_eq!(resolver.stats().opened_by_id, 3);
        assert_eq!(resolver.stats().scans, 0);

        // A removed cgroup stops resolving, even though it is still in the map.
        tree.rmdir(&late_path);
        assert_eq!(
            resolver.resolve(late_id),
            None,
            "removed cgroup still resolves"
        );
        assert_eq!(
            resolver.resolve(systemd_id).as_deref(),
            Some(systemd_path.as_str())
        );
    }

    #[test]
    fn misses_are_rate_limited() {
        let Some(root) = cgroup2_for_tests("resolver rate limit") else {
            return;
        };
        let mut tree = TestTree::new(&root, "ratelimit");
        let resolver = CgroupResolver::new(
            root,
            ResolverLimits {
                min_rescan_interval: Duration::from_secs(3600),
                ..ResolverLimits::default()
            },
        );
        // First miss scans; a flood of unknown ids afterwards does not.
        assert_eq!(resolver.resolve(u64::MAX), None);
        for unknown in 0..1000u64 {
            assert_eq!(resolver.resolve(u64::MAX - 1 - unknown), None);
        }
        let stats = resolver.stats();
        assert_eq!(stats.scans, 1, "{stats:?}");
        assert_eq!(stats.rate_limited, 1000, "{stats:?}");
        // A cgroup made during the quiet period is found by an explicit rescan.
        // A cgroup made during the quiet period is found by its id, without a scan.
        let (id, path) = tree.mkdir("late");
        assert_eq!(resolver.resolve(id).as_deref(), Some(path.as_str()));
        assert_eq!(resolver.stats().scans, 1);
        assert_eq!(resolver.stats().opened_by_id, 1);
    }

    /// Where a cgroup cannot be opened by its id (here a plain directory tree, whose file
    /// handles are not kernfs node ids), a miss rescans, and a new directory is found by
    /// the next allowed rescan; an explicit rescan finds it at once.
    #[test]
    fn without_handles_misses_fall_back_to_a_rate_limited_scan() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mkdir = |rel: &str| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {rel}: {e}"));
            std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("stat {rel}: {e}"))
                .ino()
        };
        let first = mkdir("kubepods/besteffort/pod1/c1");
        let resolver = CgroupResolver::new(
            dir.path().to_owned(),
            ResolverLimits {
                min_rescan_interval: Duration::from_secs(3600),
                ..ResolverLimits::default()
            },
        );
        assert_eq!(
            resolver.resolve(first).as_deref(),
            Some("kubepods/besteffort/pod1/c1")
        );
        let stats = resolver.stats();
        assert_eq!((stats.scans, stats.opened_by_id), (1, 0), "{stats:?}");
        let late = mkdir("kubepods/besteffort/pod2/c1");
        assert_eq!(resolver.resolve(late), None, "rate-limited");
        assert_eq!(resolver.stats().rate_limited, 1);
        resolver.rescan().unwrap_or_else(|e| panic!("rescan: {e}"));
        assert_eq!(
            resolver.resolve(late).as_deref(),
            Some("kubepods/besteffort/pod2/c1")
        );
    }

    #[test]
    fn scan_limits_bound_the_walk() {
        let Some(root) = cgroup2_for_tests("resolver limits") else {
            return;
        };
        let mut tree = TestTree::new(&root, "limits");
        let (deep_id, _) = tree.mkdir("a/b/c/d");
        let base_rel = tree
            .base
            .strip_prefix(&root)
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string_lossy()
            .into_owned();
        let base_depth = base_rel.split('/').count();
        let shallow = CgroupResolver::new(
            root.clone(),
            ResolverLimits {
                max_depth: base_depth + 2,
                ..no_rate_limit()
            },
        );
        assert_eq!(shallow.resolve(deep_id), None, "depth limit not applied");
        let few = CgroupResolver::new(
            root,
            ResolverLimits {
                max_entries: 3,
                ..no_rate_limit()
            },
        );
        few.rescan().unwrap_or_else(|e| panic!("rescan: {e}"));
        assert!(few.stats().entries <= 3, "{:?}", few.stats());
    }

    #[test]
    fn missing_mount_is_a_clear_error() {
        let resolver = CgroupResolver::new(
            PathBuf::from("/nonexistent/chaperone-cgroup"),
            no_rate_limit(),
        );
        let err = resolver.rescan().expect_err("scan of a missing directory");
        assert!(
            err.to_string().contains("/nonexistent/chaperone-cgroup"),
            "{err}"
        );
        assert_eq!(resolver.resolve(1), None);
    }
}
