//! Map key and value types shared by Chaperone's eBPF programs and its userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding so that both sides agree on the layout
//! byte for byte. Addresses are kept exactly as the kernel hands them to the programs
//! (IPv4 addresses in network byte order, i.e. the `u32` whose in-memory bytes are the
//! address octets); ports are always stored in host byte order so that userspace can
//! compare them with `SocketAddr::port()` directly.
#![no_std]

/// Names of the maps and programs in the eBPF object, used by the userspace loader.
pub mod names {
    /// Array with one [`RedirectConfig`](super::RedirectConfig) at index 0.
    pub const CONFIG_MAP: &str = "CONFIG";
    /// Hash map of API server addresses whose connections are redirected.
    pub const TARGETS_MAP: &str = "TARGETS";
    /// LRU map from socket cookie to [`Origin`](super::Origin), filled at connect().
    pub const SOCKETS_MAP: &str = "SOCKETS";
    /// LRU map from [`ConnKey`](super::ConnKey) to [`Origin`](super::Origin).
    pub const CONNECTIONS_MAP: &str = "CONNECTIONS";
    /// Per-CPU counters indexed by [`Counter`](super::Counter).
    pub const COUNTERS_MAP: &str = "COUNTERS";
    /// The cgroup/connect4 program.
    pub const CONNECT4_PROG: &str = "chaperone_connect4";
    /// The sock_ops program.
    pub const SOCKOPS_PROG: &str = "chaperone_sockops";
}

/// Capacity of the socket-cookie map; entries are short-lived (connect to established).
pub const SOCKETS_MAX: u32 = 65_536;
/// Capacity of the 4-tuple map.
pub const CONNECTIONS_MAX: u32 = 65_536;
/// Capacity of the target map.
pub const TARGETS_MAX: u32 = 1_024;

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
}

/// An API server address whose connections are redirected.
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

/// Where a redirected connection was really going, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Original destination IPv4 address, network byte order.
    pub orig_addr: u32,
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// Explicit padding, always zero.
    pub pad: u16,
    /// cgroup v2 id of the calling task (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Network namespace cookie of the calling socket.
    pub netns_cookie: u64,
    /// Thread group id (process id, in the initial pid namespace) that called connect().
    pub tgid: u32,
    /// Explicit padding, always zero.
    pub pad2: u32,
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
}

/// Number of [`Counter`] slots.
pub const COUNTERS_LEN: u32 = 4;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)] plain-old-data types with explicit padding fields,
    // no pointers and no invalid bit patterns, as aya::Pod requires.
    unsafe impl aya::Pod for super::RedirectConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Target4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Origin {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
}
