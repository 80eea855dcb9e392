//! Loads the kernel redirect and answers "where was this connection going, and who made it?"
//!
//! The eBPF object (built from `gateway-ebpf` by build.rs) holds a cgroup/connect4 program
//! that rewrites pod connections to API server addresses to the proxy listener, and a
//! sock_ops program that keys the original destination, cgroup id, netns cookie and
//! calling process by the connection's 4-tuple. Both are attached at the root of the
//! cgroup2 hierarchy, so every pod cgroup below it is covered; sockets in the node's own
//! network namespace (including this process's upstream connections) are never redirected.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use gateway_common::{ConnKey, Counter, Origin, RedirectConfig, Target4, names};

/// The compiled eBPF object, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

/// Errors loading or attaching the redirect; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// No cgroup2 hierarchy is mounted.
    #[error(
        "no cgroup2 file system is mounted (looked in /proc/self/mountinfo); Chaperone needs cgroup v2"
    )]
    NoCgroup2,
    /// Reading a system file failed.
    #[error("read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The process lacks the privileges to load eBPF programs.
    #[error(
        "loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); run chaperone as root or in a privileged DaemonSet pod"
    )]
    NotPrivileged,
    /// The proxy listener is not an IPv4 address.
    #[error("the proxy listener {0} must be an IPv4 address for the connect4 redirect")]
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

/// An error with its whole source chain (aya's top-level messages omit the errno).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What the kernel knows about a redirected connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionOrigin {
    /// The API server address the pod dialled.
    pub original_dst: SocketAddrV4,
    /// The cgroup v2 id of the calling task (the pod's container cgroup).
    pub cgroup_id: u64,
    /// The network namespace cookie of the pod's socket.
    pub netns_cookie: u64,
    /// The calling process (tgid in the node's pid namespace).
    pub pid: u32,
    /// The calling process's command name (e.g. `kubectl`, `python3`).
    pub command: String,
}

impl From<Origin> for ConnectionOrigin {
    fn from(o: Origin) -> Self {
        let len = o.comm.iter().position(|&b| b == 0).unwrap_or(o.comm.len());
        Self {
            original_dst: SocketAddrV4::new(Ipv4Addr::from(o.orig_addr.to_ne_bytes()), o.orig_port),
            cgroup_id: o.cgroup_id,
            netns_cookie: o.netns_cookie,
            pid: o.tgid,
            command: String::from_utf8_lossy(&o.comm[..len]).into_owned(),
        }
    }
}

/// Connect-path counters read from the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedirectCounters {
    /// connect() calls rewritten to the proxy.
    pub redirected: u64,
    /// connect() calls to a target from the node's own network namespace, left alone.
    pub host_namespace: u64,
    /// Redirected connections keyed by 4-tuple.
    pub attributed: u64,
    /// Map insert failures.
    pub map_errors: u64,
}

/// The loaded and attached redirect. Dropping it detaches the programs.
pub struct Interceptor {
    // Owns the programs and their links; dropping it detaches them.
    _ebpf: Ebpf,
    connections: Mutex<HashMap<MapData, ConnKey, Origin>>,
    counters: PerCpuArray<MapData, u64>,
    cgroup_root: PathBuf,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("cgroup_root", &self.cgroup_root)
            .finish_non_exhaustive()
    }
}

fn to_target(addr: SocketAddrV4) -> Target4 {
    Target4 {
        addr: u32::from_ne_bytes(addr.ip().octets()),
        port: addr.port(),
        pad: 0,
    }
}

impl Interceptor {
    /// Loads the programs, fills the maps, and attaches at the cgroup2 root.
    ///
    /// `proxy` must be a node address reachable from pod network namespaces (never
    /// 127.0.0.1: the pod's loopback is its own).
    pub fn attach(targets: &[SocketAddrV4], proxy: SocketAddr) -> Result<Self, EbpfError> {
        let SocketAddr::V4(proxy) = proxy else {
            return Err(EbpfError::NotIpv4(proxy));
        };
        if !nix::unistd::geteuid().is_root() {
            return Err(EbpfError::NotPrivileged);
        }
        let cgroup_root = cgroup2_mount()?;
        let host_netns_cookie = host_netns_cookie()?;
        let mut ebpf =
            Ebpf::load(EBPF_OBJECT).map_err(|e| kernel("load eBPF object")(chain(&e)))?;

        {
            let map = ebpf
                .map_mut(names::TARGETS_MAP)
                .ok_or_else(|| kernel("find TARGETS map")(String::new()))?;
            let mut map: HashMap<_, Target4, u8> =
                HashMap::try_from(map).map_err(|e| kernel("open TARGETS map")(chain(&e)))?;
            for target in targets {
                map.insert(to_target(*target), 1, 0).map_err(|e| {
                    kernel("insert redirect target")(format!("{target}: {}", chain(&e)))
                })?;
            }
        }
        {
            let map = ebpf
                .map_mut(names::CONFIG_MAP)
                .ok_or_else(|| kernel("find CONFIG map")(String::new()))?;
            let mut map: Array<_, RedirectConfig> =
                Array::try_from(map).map_err(|e| kernel("open CONFIG map")(chain(&e)))?;
            let config = RedirectConfig {
                proxy_addr: u32::from_ne_bytes(proxy.ip().octets()),
                proxy_port: proxy.port(),
                enabled: 1,
                host_netns_cookie,
            };
            map.set(0, config, 0)
                .map_err(|e| kernel("write redirect config")(chain(&e)))?;
        }

        let cgroup = File::open(&cgroup_root).map_err(|source| EbpfError::Io {
            path: cgroup_root.clone(),
            source,
        })?;
        {
            let prog: &mut SockOps = ebpf
                .program_mut(names::SOCKOPS_PROG)
                .ok_or_else(|| kernel("find sock_ops program")(String::new()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| {
                    kernel("sock_ops program type")(chain(&e))
                })?;
            prog.load()
                .map_err(|e| kernel("load sock_ops program")(verifier(e)))?;
            // sock_ops goes first so the 4-tuple is recorded for every redirected connect.
            // On kernels >= 5.7 aya attaches through a bpf_link, which the kernel always treats
            // as multi-attach and for which it requires the flags to be 0 (`Single`), so other
            // tools' programs on the same cgroup keep working.
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| kernel("attach sock_ops program")(chain(&e)))?;
        }
        {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(names::CONNECT4_PROG)
                .ok_or_else(|| kernel("find connect4 program")(String::new()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| {
                    kernel("connect4 program type")(chain(&e))
                })?;
            prog.load()
                .map_err(|e| kernel("load connect4 program")(verifier(e)))?;
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| kernel("attach connect4 program")(chain(&e)))?;
        }

        let connections = ebpf
            .take_map(names::CONNECTIONS_MAP)
            .ok_or_else(|| kernel("find CONNECTIONS map")(String::new()))?;
        let connections = HashMap::try_from(connections)
            .map_err(|e| kernel("open CONNECTIONS map")(chain(&e)))?;
        let counters = ebpf
            .take_map(names::COUNTERS_MAP)
            .ok_or_else(|| kernel("find COUNTERS map")(String::new()))?;
        let counters =
            PerCpuArray::try_from(counters).map_err(|e| kernel("open COUNTERS map")(chain(&e)))?;
        tracing::info!(cgroup_root = %cgroup_root.display(), %proxy, targets = ?targets, "eBPF redirect attached");
        Ok(Self {
            _ebpf: ebpf,
            connections: Mutex::new(connections),
            counters,
            cgroup_root,
        })
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
            client_addr: u32::from_ne_bytes(peer.ip().octets()),
            proxy_addr: u32::from_ne_bytes(local.ip().octets()),
            client_port: peer.port(),
            proxy_port: local.port(),
        };
        let mut map = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let origin = map.get(&key, 0).ok()?;
        // The entry has served its purpose; removing it keeps the LRU map for live connects.
        let _ = map.remove(&key);
        Some(origin.into())
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
        }
    }
}

fn verifier(e: aya::programs::ProgramError) -> String {
    // The verifier log is long; keep its tail, which says what was rejected.
    let text = format!("{e:#}");
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Finds the cgroup2 mount point in /proc/self/mountinfo (it is `/sys/fs/cgroup` on most
/// Kubernetes nodes, `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf, EbpfError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| EbpfError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or(EbpfError::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(unescape_mountinfo))?
    })
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
    .map_err(|e| kernel("socket() for SO_NETNS_COOKIE")(chain(&e)))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let none = "22 1 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(parse_cgroup2_mount(none), None);
        let escaped = "30 1 0:26 / /mnt/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(
            parse_cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
    }

    #[test]
    fn origin_decodes_kernel_layout() {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"kubectl");
        let origin = Origin {
            orig_addr: u32::from_ne_bytes([169, 254, 77, 100]),
            orig_port: 443,
            pad: 0,
            cgroup_id: 42,
            netns_cookie: 7,
            tgid: 1234,
            pad2: 0,
            comm,
        };
        let decoded = ConnectionOrigin::from(origin);
        assert_eq!(decoded.original_dst, "169.254.77.100:443".parse().unwrap());
        assert_eq!(decoded.command, "kubectl");
        assert_eq!(decoded.cgroup_id, 42);
        assert_eq!(
            to_target("169.254.77.100:443".parse().unwrap()).addr,
            origin.orig_addr
        );
    }
}
