//! Map key and value types shared by Chaperone's eBPF programs and its userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding so that both sides agree on the layout
//! byte for byte. Addresses are kept exactly as the kernel hands them to the programs
//! (network byte order: the `u32`s whose in-memory bytes are the address octets); ports are
//! always stored in host byte order so that userspace can compare them with
//! `SocketAddr::port()` directly.
#![no_std]

/// Names of the maps and programs in the eBPF object, used by the userspace loader.
pub mod names {
    /// Array with one [`RedirectConfig`](super::RedirectConfig) at index 0.
    pub const CONFIG_MAP: &str = "CONFIG";
    /// Array with the daemon's last heartbeat (CLOCK_MONOTONIC ns) at index 0.
    pub const HEARTBEAT_MAP: &str = "HEARTBEAT";
    /// Hash map of IPv4 API server addresses whose connections are redirected.
    pub const TARGETS_MAP: &str = "TARGETS";
    /// Hash map of IPv6 API server addresses whose connections are redirected.
    pub const TARGETS6_MAP: &str = "TARGETS6";
    /// cgroup ids classified out of scope: connect directly.
    pub const BYPASS_MAP: &str = "BYPASS";
    /// cgroup ids that connect directly while the daemon is down (opt-in fail-open).
    pub const FAILOPEN_MAP: &str = "FAILOPEN";
    /// LRU map from socket cookie to [`Origin`](super::Origin), filled at connect().
    pub const SOCKETS_MAP: &str = "SOCKETS";
    /// LRU map from [`ConnKey`](super::ConnKey) to [`Origin`](super::Origin).
    pub const CONNECTIONS_MAP: &str = "CONNECTIONS";
    /// LRU set of raw sockets created in pod network namespaces (socket cookies).
    pub const RAW_SOCKETS_MAP: &str = "RAW_SOCKETS";
    /// Per-CPU counters indexed by [`Counter`](super::Counter).
    pub const COUNTERS_MAP: &str = "COUNTERS";
    /// The cgroup/connect4 program.
    pub const CONNECT4_PROG: &str = "chaperone_connect4";
    /// The cgroup/connect6 program.
    pub const CONNECT6_PROG: &str = "chaperone_connect6";
    /// The cgroup/getpeername4 program.
    pub const GETPEERNAME4_PROG: &str = "chaperone_getpeername4";
    /// The cgroup/getpeername6 program.
    pub const GETPEERNAME6_PROG: &str = "chaperone_getpeername6";
    /// The sock_ops program.
    pub const SOCKOPS_PROG: &str = "chaperone_sockops";
    /// The cgroup/sock_create program marking raw sockets.
    pub const SOCK_CREATE_PROG: &str = "chaperone_sock_create";
    /// The cgroup_skb/egress raw-socket guard.
    pub const EGRESS_GUARD_PROG: &str = "chaperone_egress_guard";
}

/// Default capacity of the socket-cookie map.
pub const SOCKETS_MAX: u32 = 65_536;
/// Default capacity of the 4-tuple map.
pub const CONNECTIONS_MAX: u32 = 65_536;
/// Capacity of each target map.
pub const TARGETS_MAX: u32 = 1_024;
/// Default capacity of the bypass and fail-open maps.
pub const CGROUPS_MAX: u32 = 16_384;
/// Capacity of the raw-socket set.
pub const RAW_SOCKETS_MAX: u32 = 8_192;

/// Redirect settings written by userspace before the programs see any traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The proxy listener's IPv4 address, network byte order.
    pub proxy_addr: u32,
    /// The proxy listener's port, host byte order.
    pub proxy_port: u16,
    /// 1 once userspace has written the config; 0 means "not ready, redirect nothing".
    pub enabled: u16,
    /// The network namespace cookie of the node (host) namespace: its sockets, including
    /// the gateway's own upstream connections, are never redirected.
    pub host_netns_cookie: u64,
    /// A heartbeat older than this (ns) means the daemon is down (for fail-open cgroups).
    pub failopen_after_ns: u64,
}

/// An IPv4 API server address whose connections are redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Target4 {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, host byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

/// An IPv6 API server address whose connections are redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Target6 {
    /// IPv6 address, network byte order.
    pub addr: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
}

/// Address family tag in [`Origin::family`].
pub const FAMILY_V4: u16 = 4;
/// Address family tag in [`Origin::family`].
pub const FAMILY_V6: u16 = 6;

/// Where a redirected connection was really going, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Original destination: IPv6, or for IPv4 the address in the last word.
    pub orig_addr: [u32; 4],
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`] (a v4-mapped destination dialled from an IPv6 socket
    /// is `FAMILY_V6` with the mapped address, which is what getpeername must return).
    pub family: u16,
    /// Thread group id (process id, in the initial pid namespace) that called connect().
    pub tgid: u32,
    /// cgroup v2 id of the calling task (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Network namespace cookie of the calling socket.
    pub netns_cookie: u64,
    /// Command name of the calling task, NUL-padded.
    pub comm: [u8; 16],
}

/// A redirected connection as the proxy sees it after accept(): the client's address and
/// port, and the proxy address and port it was redirected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Client IPv4 address, network byte order.
    pub client_addr: u32,
    /// Proxy IPv4 address, network byte order.
    pub proxy_addr: u32,
    /// Client port, host byte order.
    pub client_port: u16,
    /// Proxy port, host byte order.
    pub proxy_port: u16,
}

/// Connect-path counters, indexes into the per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() calls rewritten to the proxy.
    Redirected = 0,
    /// connect() calls to a target from the host namespace, left alone.
    HostNamespace = 1,
    /// Redirected connections whose 4-tuple was recorded by sock_ops.
    Attributed = 2,
    /// Map insert failures (the connection is still redirected, attribution may fail).
    MapErrors = 3,
    /// connect() calls to a target from a bypassed cgroup, left alone.
    Bypassed = 4,
    /// connect() calls let through directly because the daemon is down (fail-open).
    FailOpen = 5,
    /// Packets from raw sockets to an API server address, dropped.
    GuardDrops = 6,
    /// Redirected sockets closed (their map entries removed).
    Closed = 7,
}

/// Number of [`Counter`] slots.
pub const COUNTERS_LEN: u32 = 8;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)] plain-old-data types with explicit padding fields,
    // no pointers and no invalid bit patterns, as aya::Pod requires.
    unsafe impl aya::Pod for super::RedirectConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Target4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Target6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Origin {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
}
