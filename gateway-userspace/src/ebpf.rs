//! Loads the kernel redirect and answers "where was this connection going, and who made it?"
//!
//! The eBPF object (built from `gateway-ebpf` by build.rs) is attached at the root of the
//! cgroup2 hierarchy, so every pod cgroup below it is covered; sockets in the node's own
//! network namespace (including this process's upstream connections) are never redirected.
//!
//! Maps and links are pinned under bpffs (`<pin path>/<object hash>/{maps,links}`). When the
//! daemon stops, the links stay and keep redirecting intercepted pods to the proxy port,
//! where nothing listens: their connections are refused, never sent to the API server
//! directly (fail closed). A restarted daemon of the same build adopts the pinned links and
//! maps; a different build attaches its own programs first and then removes the old ones.
//! `chaperone uninstall` removes everything.

use std::{
    collections::HashSet,
    fs::File,
    hash::{Hash as _, Hasher as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use crate::error_chain as chain;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkbAttachType,
        links::{FdLink, PinnedLink},
    },
};
use gateway_common::{
    ConnKey, Counter, FAMILY_V4, Origin, RedirectConfig, Target4, Target6, names,
};
use serde::Serialize;

/// The compiled eBPF object, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

/// Default bpffs directory for Chaperone's pins.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/chaperone";

/// Programs in attach order: attribution and guards before the redirect itself, so a
/// redirected connect is always attributed.
const PROGRAMS: [&str; 7] = [
    names::SOCKOPS_PROG,
    names::GETPEERNAME4_PROG,
    names::GETPEERNAME6_PROG,
    names::SOCK_CREATE_PROG,
    names::EGRESS_GUARD_PROG,
    names::CONNECT6_PROG,
    names::CONNECT4_PROG,
];

/// Errors loading or attaching the redirect; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// No cgroup2 hierarchy is mounted.
    #[error(
        "no cgroup2 file system is mounted (looked in /proc/self/mountinfo); Chaperone needs cgroup v2"
    )]
    NoCgroup2,
    /// Reading or writing a system file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The process lacks the privileges to load eBPF programs.
    #[error(
        "loading eBPF programs needs uid 0 with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; run chaperone as root, or in the DaemonSet of deploy/ (which grants those)"
    )]
    NotPrivileged,
    /// The proxy listener is not an IPv4 address.
    #[error("the proxy listener {0} must be an IPv4 address for the redirect")]
    NotIpv4(SocketAddr),
    /// The kernel or aya refused something.
    #[error("{step}: {message}")]
    Kernel {
        /// What was being done.
        step: &'static str,
        /// The underlying error.
        message: String,
    },
}

fn kernel(step: &'static str) -> impl FnOnce(String) -> EbpfError {
    move |message| EbpfError::Kernel { step, message }
}

/// What the kernel knows about a redirected connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionOrigin {
    /// The API server address the pod dialled.
    pub original_dst: SocketAddr,
    /// The cgroup v2 id of the calling task (the pod's container cgroup).
    pub cgroup_id: u64,
    /// The network namespace cookie of the pod's socket.
    pub netns_cookie: u64,
    /// The calling process (tgid in the node's pid namespace).
    pub pid: u32,
    /// The calling process's command name (e.g. `kubectl`, `python3`).
    pub command: String,
}

fn ipv6_from_words(words: [u32; 4]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

fn words_from_ipv6(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
}

fn v4_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl From<Origin> for ConnectionOrigin {
    fn from(o: Origin) -> Self {
        let len = o.comm.iter().position(|&b| b == 0).unwrap_or(o.comm.len());
        let ip = if o.family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::from(o.orig_addr[3].to_ne_bytes()))
        } else {
            IpAddr::V6(ipv6_from_words(o.orig_addr))
        };
        Self {
            original_dst: SocketAddr::new(ip, o.orig_port),
            cgroup_id: o.cgroup_id,
            netns_cookie: o.netns_cookie,
            pid: o.tgid,
            command: String::from_utf8_lossy(&o.comm[..len]).into_owned(),
        }
    }
}

/// Connect-path counters read from the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RedirectCounters {
    /// connect() calls rewritten to the proxy.
    pub redirected: u64,
    /// connect() calls to a target from the node's own network namespace, left alone.
    pub host_namespace: u64,
    /// Redirected connections keyed by 4-tuple.
    pub attributed: u64,
    /// Map insert failures.
    pub map_errors: u64,
    /// connect() calls from bypassed (out-of-scope) cgroups, left alone.
    pub bypassed: u64,
    /// connect() calls let through because the daemon was down (fail-open cgroups).
    pub fail_open: u64,
    /// Raw-socket packets to API server addresses, dropped.
    pub guard_drops: u64,
    /// Redirected sockets closed.
    pub closed: u64,
}

/// Settings for [`Interceptor::attach`].
#[derive(Debug, Clone)]
pub struct InterceptorSettings {
    /// API server addresses whose connections are redirected.
    pub targets: Vec<SocketAddr>,
    /// The proxy listener: a node address reachable from pod network namespaces.
    pub proxy: SocketAddr,
    /// bpffs directory for pins.
    pub pin_path: PathBuf,
    /// A fail-open cgroup connects directly once the daemon's heartbeat is this old.
    pub fail_open_after: Duration,
    /// Capacity of the 4-tuple and socket-cookie maps (LRU).
    pub connections_max: u32,
}

/// A snapshot of the kernel side, for `chaperone status` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct InterceptionStatus {
    /// The versioned pin directory in use.
    pub pin_dir: PathBuf,
    /// The cgroup2 root the programs are attached to.
    pub cgroup_root: PathBuf,
    /// Attached programs (pinned links).
    pub programs: Vec<String>,
    /// Redirected API server addresses.
    pub targets: Vec<SocketAddr>,
    /// Bypassed cgroup ids.
    pub bypass: Vec<u64>,
    /// Fail-open cgroup ids.
    pub fail_open: Vec<u64>,
    /// Entries in the 4-tuple map (connections accepted but not yet looked up, or open).
    pub connections: usize,
    /// Capacity of the 4-tuple map.
    pub connections_max: u32,
    /// Connect-path counters.
    pub counters: RedirectCounters,
}

struct Maps {
    connections: HashMap<MapData, ConnKey, Origin>,
    targets: HashMap<MapData, Target4, u8>,
    targets6: HashMap<MapData, Target6, u8>,
    bypass: HashMap<MapData, u64, u8>,
    fail_open: HashMap<MapData, u64, u8>,
    heartbeat: Array<MapData, u64>,
}

/// The loaded and attached redirect. Dropping it keeps the pinned programs attached (fail
/// closed); [`Interceptor::uninstall`] removes them.
pub struct Interceptor {
    // Owns the loaded programs; the pinned links keep them attached beyond this process.
    _ebpf: Ebpf,
    maps: Mutex<Maps>,
    counters: PerCpuArray<MapData, u64>,
    cgroup_root: PathBuf,
    pin_root: PathBuf,
    pin_dir: PathBuf,
    connections_max: u32,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

/// A short identifier of this build's eBPF object, naming its pin directory.
fn object_version() -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    EBPF_OBJECT.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| kernel("find map")(name.to_owned()))?;
    T::try_from(map).map_err(|e| kernel("open map")(format!("{name}: {}", chain(&e))))
}

impl Interceptor {
    /// Loads (or adopts) the programs and maps, fills the maps, and attaches at the cgroup2
    /// root.
    pub fn attach(s: &InterceptorSettings) -> Result<Self, EbpfError> {
        let SocketAddr::V4(proxy) = s.proxy else {
            return Err(EbpfError::NotIpv4(s.proxy));
        };
        if !nix::unistd::geteuid().is_root() {
            return Err(EbpfError::NotPrivileged);
        }
        let cgroup_root = cgroup2_mount()?;
        ensure_bpffs(&s.pin_path)?;
        let pin_dir = s.pin_path.join(object_version());
        let (maps_dir, links_dir) = (pin_dir.join("maps"), pin_dir.join("links"));
        for dir in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| EbpfError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        let host_netns_cookie = host_netns_cookie()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(names::CONNECTIONS_MAP, s.connections_max)
            .map_max_entries(names::SOCKETS_MAP, s.connections_max)
            .load(EBPF_OBJECT)
            .map_err(|e| kernel("load eBPF object")(chain(&e)))?;

        let mut maps = Maps {
            connections: take(&mut ebpf, names::CONNECTIONS_MAP)?,
            targets: take(&mut ebpf, names::TARGETS_MAP)?,
            targets6: take(&mut ebpf, names::TARGETS6_MAP)?,
            bypass: take(&mut ebpf, names::BYPASS_MAP)?,
            fail_open: take(&mut ebpf, names::FAILOPEN_MAP)?,
            heartbeat: take(&mut ebpf, names::HEARTBEAT_MAP)?,
        };
        let counters = take(&mut ebpf, names::COUNTERS_MAP)?;
        let mut config: Array<MapData, RedirectConfig> = take(&mut ebpf, names::CONFIG_MAP)?;
        set_targets(&mut maps, &s.targets)?;
        write_heartbeat(&mut maps.heartbeat)?;
        let failopen_after_ns = u64::try_from(s.fail_open_after.as_nanos()).unwrap_or(u64::MAX);
        config
            .set(
                0,
                RedirectConfig {
                    proxy_addr: v4_word(*proxy.ip()),
                    proxy_port: proxy.port(),
                    enabled: 1,
                    host_netns_cookie,
                    failopen_after_ns,
                },
                0,
            )
            .map_err(|e| kernel("write redirect config")(chain(&e)))?;

        let cgroup = File::open(&cgroup_root).map_err(|source| EbpfError::Io {
            path: cgroup_root.clone(),
            source,
        })?;
        let mut adopted = 0;
        for name in PROGRAMS {
            let pin = links_dir.join(name);
            if pin.exists() && PinnedLink::from_pin(&pin).is_ok() {
                adopted += 1;
                continue;
            }
            let _ = std::fs::remove_file(&pin);
            attach_and_pin(&mut ebpf, name, &cgroup, &pin)?;
        }
        // Older builds' programs go only now that ours redirect: no bypass window.
        remove_other_versions(&s.pin_path, &pin_dir);
        tracing::info!(
            cgroup_root = %cgroup_root.display(),
            pin_dir = %pin_dir.display(),
            adopted,
            %proxy,
            targets = ?s.targets,
            "eBPF redirect attached"
        );
        Ok(Self {
            _ebpf: ebpf,
            maps: Mutex::new(maps),
            counters,
            cgroup_root,
            pin_root: s.pin_path.clone(),
            pin_dir,
            connections_max: s.connections_max,
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cgroup2 directory the programs are attached to.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Looks up (and forgets) the origin of an accepted connection: `peer` is the client's
    /// address as returned by accept(), `local` the proxy address it arrived on.
    pub fn origin(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnectionOrigin> {
        let (SocketAddr::V4(peer), SocketAddr::V4(local)) = (peer, local) else {
            return None;
        };
        let key = ConnKey {
            client_addr: v4_word(*peer.ip()),
            proxy_addr: v4_word(*local.ip()),
            client_port: peer.port(),
            proxy_port: local.port(),
        };
        let mut maps = self.maps();
        let origin = maps.connections.get(&key, 0).ok()?;
        // The entry has served its purpose; the socket-cookie entry stays for getpeername
        // until the socket closes.
        let _ = maps.connections.remove(&key);
        Some(origin.into())
    }

    /// Replaces the redirected API server addresses.
    pub fn set_targets(&self, targets: &[SocketAddr]) -> Result<(), EbpfError> {
        set_targets(&mut self.maps(), targets)
    }

    /// Puts a cgroup out of scope (its connections go directly) or back in scope.
    pub fn set_bypass(&self, cgroup_id: u64, bypass: bool) -> Result<(), EbpfError> {
        let mut maps = self.maps();
        if bypass {
            maps.bypass
                .insert(cgroup_id, 1, 0)
                .map_err(|e| kernel("insert bypass entry")(chain(&e)))
        } else {
            remove_if_present(&mut maps.bypass, &cgroup_id)
        }
    }

    /// Lets a cgroup connect directly while the daemon is down (opt-in fail-open).
    pub fn set_fail_open(&self, cgroup_id: u64, fail_open: bool) -> Result<(), EbpfError> {
        let mut maps = self.maps();
        if fail_open {
            maps.fail_open
                .insert(cgroup_id, 1, 0)
                .map_err(|e| kernel("insert fail-open entry")(chain(&e)))
        } else {
            remove_if_present(&mut maps.fail_open, &cgroup_id)
        }
    }

    /// Tells the kernel side the daemon is alive (fail-open cgroups are redirected while
    /// heartbeats are fresh).
    pub fn heartbeat(&self) -> Result<(), EbpfError> {
        write_heartbeat(&mut self.maps().heartbeat)
    }

    /// Sums the per-CPU connect-path counters.
    pub fn counters(&self) -> RedirectCounters {
        let read = |c: Counter| -> u64 {
            self.counters
                .get(&(c as u32), 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        RedirectCounters {
            redirected: read(Counter::Redirected),
            host_namespace: read(Counter::HostNamespace),
            attributed: read(Counter::Attributed),
            map_errors: read(Counter::MapErrors),
            bypassed: read(Counter::Bypassed),
            fail_open: read(Counter::FailOpen),
            guard_drops: read(Counter::GuardDrops),
            closed: read(Counter::Closed),
        }
    }

    /// A snapshot for `chaperone status` and metrics.
    pub fn status(&self) -> InterceptionStatus {
        let maps = self.maps();
        let mut targets: Vec<SocketAddr> = maps
            .targets
            .keys()
            .filter_map(Result::ok)
            .filter(|t| t.port != 0)
            .map(|t| SocketAddr::new(Ipv4Addr::from(t.addr.to_ne_bytes()).into(), t.port))
            .collect();
        targets.extend(
            maps.targets6
                .keys()
                .filter_map(Result::ok)
                .filter(|t| t.port != 0)
                .map(|t| SocketAddr::new(ipv6_from_words(t.addr).into(), t.port)),
        );
        targets.sort();
        let programs = std::fs::read_dir(self.pin_dir.join("links"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        InterceptionStatus {
            pin_dir: self.pin_dir.clone(),
            cgroup_root: self.cgroup_root.clone(),
            programs,
            targets,
            bypass: maps.bypass.keys().filter_map(Result::ok).collect(),
            fail_open: maps.fail_open.keys().filter_map(Result::ok).collect(),
            connections: maps.connections.keys().count(),
            connections_max: self.connections_max,
            counters: self.counters(),
        }
    }

    /// Detaches the programs and removes every pin (this build's and older ones').
    pub fn uninstall(self) -> Result<(), EbpfError> {
        let root = self.pin_root.clone();
        drop(self);
        uninstall(&root)
    }
}

fn remove_if_present(map: &mut HashMap<MapData, u64, u8>, key: &u64) -> Result<(), EbpfError> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(kernel("remove map entry")(chain(&e))),
    }
}

fn write_heartbeat(map: &mut Array<MapData, u64>) -> Result<(), EbpfError> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_err(|e| kernel("read CLOCK_MONOTONIC")(e.to_string()))?;
    let ns = u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0);
    map.set(0, ns, 0)
        .map_err(|e| kernel("write heartbeat")(chain(&e)))
}

/// Makes the target maps hold exactly `targets` (plus, per address, a port-0 entry the
/// raw-socket guard matches on: a raw socket can speak any port).
fn set_targets(maps: &mut Maps, targets: &[SocketAddr]) -> Result<(), EbpfError> {
    let mut want4 = HashSet::new();
    let mut want6 = HashSet::new();
    for target in targets {
        // A v4-mapped target is an IPv4 address; connect6 looks those up in the IPv4 map.
        let ip = match target.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        for port in [target.port(), 0] {
            match ip {
                IpAddr::V4(v4) => want4.insert(Target4 {
                    addr: v4_word(v4),
                    port,
                    pad: 0,
                }),
                IpAddr::V6(v6) => want6.insert(Target6 {
                    addr: words_from_ipv6(v6),
                    port,
                    pad: 0,
                }),
            };
        }
    }
    sync_set(&mut maps.targets, &want4)?;
    sync_set(&mut maps.targets6, &want6)
}

/// Makes a map used as a set hold exactly `want`: stale keys out, missing keys in.
fn sync_set<K>(map: &mut HashMap<MapData, K, u8>, want: &HashSet<K>) -> Result<(), EbpfError>
where
    K: aya::Pod + Eq + std::hash::Hash + std::fmt::Debug,
{
    let have: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for stale in have.iter().filter(|k| !want.contains(k)) {
        let _ = map.remove(stale);
    }
    for k in want {
        map.insert(k, 1, 0)
            .map_err(|e| kernel("insert redirect target")(format!("{k:?}: {}", chain(&e))))?;
    }
    Ok(())
}

fn attach_and_pin(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    pin: &Path,
) -> Result<(), EbpfError> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| kernel("find program")(name.to_owned()))?;
    // On kernels >= 5.7 aya attaches through a bpf_link, which the kernel always treats as
    // multi-attach and for which it requires the flags to be 0 (`Single`), so other tools'
    // programs on the same cgroup keep working.
    let mode = CgroupAttachMode::Single;
    let load_err = |e: aya::programs::ProgramError| {
        kernel("load program")(format!("{name}: {}", verifier(&e)))
    };
    let attach_err =
        |e: aya::programs::ProgramError| kernel("attach program")(format!("{name}: {}", chain(&e)));
    let link: FdLink = match program {
        aya::programs::Program::SockOps(p) => {
            p.load().map_err(load_err)?;
            let id = p.attach(cgroup, mode).map_err(attach_err)?;
            p.take_link(id).map_err(attach_err)?.try_into()
        }
        aya::programs::Program::CgroupSockAddr(p) => {
            p.load().map_err(load_err)?;
            let id = p.attach(cgroup, mode).map_err(attach_err)?;
            p.take_link(id).map_err(attach_err)?.try_into()
        }
        aya::programs::Program::CgroupSock(p) => {
            p.load().map_err(load_err)?;
            let id = p.attach(cgroup, mode).map_err(attach_err)?;
            p.take_link(id).map_err(attach_err)?.try_into()
        }
        aya::programs::Program::CgroupSkb(p) => {
            p.load().map_err(load_err)?;
            let id = p
                .attach(cgroup, CgroupSkbAttachType::Egress, mode)
                .map_err(attach_err)?;
            p.take_link(id).map_err(attach_err)?.try_into()
        }
        _ => {
            return Err(kernel("attach program")(format!(
                "{name}: unexpected program type"
            )));
        }
    }
    .map_err(|e: aya::programs::links::LinkError| {
        kernel("take link")(format!("{name}: {}", chain(&e)))
    })?;
    link.pin(pin)
        .map_err(|e| kernel("pin link")(format!("{}: {}", pin.display(), chain(&e))))?;
    Ok(())
}

fn verifier(e: &aya::programs::ProgramError) -> String {
    // The verifier log is long; keep its tail, which says what was rejected.
    let text = format!("{e:#}");
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Removes pin directories of other builds under `root`, detaching their programs.
fn remove_other_versions(root: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path != keep && path.is_dir() {
            tracing::info!(dir = %path.display(), "removing the pins of another chaperone build");
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Uninstalls the pins under a directory when dropped (unless disarmed): for daemons with
/// `detachOnExit`, and for tests, so that a failing test leaves nothing attached.
#[derive(Debug)]
pub struct PinGuard(Option<PathBuf>);

impl PinGuard {
    /// Removes `root` on drop.
    pub fn new(root: PathBuf) -> Self {
        Self(Some(root))
    }

    /// Removes nothing.
    pub fn disarmed() -> Self {
        Self(None)
    }

    /// Whether dropping it will remove the pins.
    pub fn is_armed(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(root) = self.0.take()
            && let Err(e) = uninstall(&root)
        {
            tracing::warn!(error = %e, "removing eBPF pins failed");
        }
    }
}

/// Detaches every Chaperone program and removes every pinned map under `root`.
pub fn uninstall(root: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_dir_all(root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(EbpfError::Io {
            path: root.to_owned(),
            source,
        }),
    }
}

/// Mounts bpffs at /sys/fs/bpf when `pin_path` lies below it and nothing is mounted there.
fn ensure_bpffs(pin_path: &Path) -> Result<(), EbpfError> {
    let mountinfo = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(mountinfo).map_err(|source| EbpfError::Io {
        path: mountinfo.to_owned(),
        source,
    })?;
    let covered = mounts_of_type(&text, "bpf")
        .iter()
        .any(|m| pin_path.starts_with(m));
    if covered {
        return Ok(());
    }
    let bpffs = Path::new("/sys/fs/bpf");
    if !pin_path.starts_with(bpffs) {
        return Err(kernel("find bpffs")(format!(
            "{} is not on a bpf file system; mount one there or use a path below /sys/fs/bpf",
            pin_path.display()
        )));
    }
    nix::mount::mount(
        Some("bpf"),
        bpffs,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        kernel("mount bpffs at /sys/fs/bpf")(format!(
            "{e}; mount it on the node (`mount -t bpf bpf /sys/fs/bpf`, which systemd does at boot) and mount the node's /sys/fs/bpf into the container"
        ))
    })
}

/// Finds the cgroup2 mount point in /proc/self/mountinfo (it is `/sys/fs/cgroup` on most
/// Kubernetes nodes, `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf, EbpfError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| EbpfError::Io {
        path: path.to_owned(),
        source,
    })?;
    mounts_of_type(&text, "cgroup2")
        .into_iter()
        .next()
        .ok_or(EbpfError::NoCgroup2)
}

fn mounts_of_type(mountinfo: &str, wanted: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mount-point options [optional...] - fstype source
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            (fstype == wanted).then(|| left.split_whitespace().nth(4).map(unescape_mountinfo))?
        })
        .collect()
}

fn unescape_mountinfo(field: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo octal.
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// The network namespace cookie of this process's namespace (the node's, for the daemon).
pub fn host_netns_cookie() -> Result<u64, EbpfError> {
    netns_cookie_of_current()
}

#[expect(
    unsafe_code,
    reason = "SO_NETNS_COOKIE has no safe wrapper in nix or std"
)]
fn netns_cookie_of_current() -> Result<u64, EbpfError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| kernel("socket() for SO_NETNS_COOKIE")(e.to_string()))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a valid, writable u64 and `len` holds its size, as the
    // SO_NETNS_COOKIE getsockopt (Linux 5.14+) requires; the fd is open for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(kernel("getsockopt(SO_NETNS_COOKIE), needs Linux 5.14+")(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(cookie)
}

/// Checks, without changing anything, that this process can run the redirect here; the
/// error is one sentence naming what is missing.
pub fn preflight() -> Result<(), EbpfError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(EbpfError::NotPrivileged);
    }
    cgroup2_mount()?;
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        return Err(kernel("check kernel BTF")(format!(
            "{} is missing: the kernel lacks BTF",
            btf.display()
        )));
    }
    host_netns_cookie()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_and_bpf_mounts_in_hybrid_and_unified_layouts() {
        let hybrid = "25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw\n\
                      40 22 0:35 / /sys/fs/bpf rw - bpf bpf rw\n";
        assert_eq!(
            mounts_of_type(hybrid, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        assert_eq!(
            mounts_of_type(hybrid, "bpf"),
            vec![PathBuf::from("/sys/fs/bpf")]
        );
        let unified =
            "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            mounts_of_type(unified, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
        assert!(mounts_of_type("22 1 0:5 / /proc rw - proc proc rw\n", "cgroup2").is_empty());
        let escaped = "30 1 0:26 / /mnt/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(
            mounts_of_type(escaped, "cgroup2"),
            vec![PathBuf::from("/mnt/my cgroup")]
        );
    }

    #[test]
    fn origin_decodes_kernel_layout_for_both_families() {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"kubectl");
        let v4 = Origin {
            orig_addr: [0, 0, 0, v4_word(Ipv4Addr::new(169, 254, 77, 100))],
            orig_port: 443,
            family: FAMILY_V4,
            tgid: 1234,
            cgroup_id: 42,
            netns_cookie: 7,
            comm,
        };
        let decoded = ConnectionOrigin::from(v4);
        assert_eq!(
            decoded.original_dst,
            "169.254.77.100:443".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            (decoded.command.as_str(), decoded.cgroup_id, decoded.pid),
            ("kubectl", 42, 1234)
        );
        let ip6: Ipv6Addr = "fd00:77::100".parse().unwrap();
        let v6 = Origin {
            orig_addr: words_from_ipv6(ip6),
            family: gateway_common::FAMILY_V6,
            ..v4
        };
        assert_eq!(
            ConnectionOrigin::from(v6).original_dst,
            SocketAddr::new(ip6.into(), 443)
        );
    }
}
