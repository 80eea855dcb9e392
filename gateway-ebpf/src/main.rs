//! Chaperone's kernel side.
//!
//! * `chaperone_connect4`/`chaperone_connect6` (cgroup/connect4|6): a TCP connect() from a
//!   pod network namespace to an API server address (IPv4, IPv6 or v4-mapped) is rewritten
//!   to the node-local proxy listener, unless the cgroup is bypassed (out of scope) or
//!   fail-open while the daemon is down. The original destination, cgroup id, netns cookie
//!   and calling process are remembered under the socket's cookie.
//! * `chaperone_sockops` (sock_ops): when such a socket starts its handshake the record is
//!   re-keyed by the connection's 4-tuple, which is what the proxy knows after accept();
//!   the socket-cookie entry is removed when the socket closes, the 4-tuple entry when
//!   the proxy has looked it up (both maps are LRU-bounded).
//! * `chaperone_getpeername4|6`: the client sees the address it dialled, not the proxy.
//! * `chaperone_sock_create` + `chaperone_egress_guard` (cgroup/sock_create, cgroup_skb
//!   egress): packets from raw sockets in pod namespaces to API server addresses are
//!   dropped, so CAP_NET_RAW cannot hand-craft a way around the redirect.
//!
//! Every map is pinned by name, so a restarted daemon adopts them and the links keep
//! redirecting (to a closed port: fail closed) while it is down.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, sk_action,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use gateway_common::{
    CGROUPS_MAX, CONNECTIONS_MAX, COUNTERS_LEN, ConnKey, Counter, FAMILY_V4, FAMILY_V6, Origin,
    RAW_SOCKETS_MAX, RedirectConfig, SOCKETS_MAX, TARGETS_MAX, Target4, Target6,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_RAW: u32 = 3;
const TCP_CLOSE: u32 = 7;
/// `::ffff:0:0/96` prefix word, network byte order.
const V4_MAPPED_PREFIX: u32 = 0xffff_u32.to_be();

#[map(name = "CONFIG")]
static CONFIG: Array<RedirectConfig> = Array::pinned(1, 0);

#[map(name = "HEARTBEAT")]
static HEARTBEAT: Array<u64> = Array::pinned(1, 0);

#[map(name = "TARGETS")]
static TARGETS: HashMap<Target4, u8> = HashMap::pinned(TARGETS_MAX, 0);

#[map(name = "TARGETS6")]
static TARGETS6: HashMap<Target6, u8> = HashMap::pinned(TARGETS_MAX, 0);

#[map(name = "BYPASS")]
static BYPASS: HashMap<u64, u8> = HashMap::pinned(CGROUPS_MAX, 0);

#[map(name = "FAILOPEN")]
static FAILOPEN: HashMap<u64, u8> = HashMap::pinned(CGROUPS_MAX, 0);

#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<u64, Origin> = LruHashMap::pinned(SOCKETS_MAX, 0);

#[map(name = "CONNECTIONS")]
static CONNECTIONS: LruHashMap<ConnKey, Origin> = LruHashMap::pinned(CONNECTIONS_MAX, 0);

#[map(name = "RAW_SOCKETS")]
static RAW_SOCKETS: LruHashMap<u64, u8> = LruHashMap::pinned(RAW_SOCKETS_MAX, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_LEN, 0);

/// Reads the IPv6 address from a sock_addr context word by word: the verifier only allows
/// 4-byte accesses to `user_ip6`, never the memcpy a whole-array copy compiles to.
fn read_ip6(sa: &aya_ebpf::bindings::bpf_sock_addr) -> [u32; 4] {
    // SAFETY: each pointer is to a field of the live context.
    unsafe {
        [
            core::ptr::read_volatile(&sa.user_ip6[0]),
            core::ptr::read_volatile(&sa.user_ip6[1]),
            core::ptr::read_volatile(&sa.user_ip6[2]),
            core::ptr::read_volatile(&sa.user_ip6[3]),
        ]
    }
}

/// Writes the IPv6 address into a sock_addr context word by word (see [`read_ip6`]).
fn write_ip6(sa: &mut aya_ebpf::bindings::bpf_sock_addr, ip: [u32; 4]) {
    // SAFETY: each pointer is to a field of the live context, writable for this program.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], ip[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], ip[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], ip[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], ip[3]);
    }
}

/// Lets the syscall proceed (to the rewritten or the original address).
const PROCEED: i32 = 1;
/// cgroup_skb: let the packet pass / drop it.
const PASS: i32 = 1;
const DROP: i32 = 0;

fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and is only
        // touched by this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

fn config() -> Option<&'static RedirectConfig> {
    CONFIG.get(0).filter(|c| c.enabled != 0)
}

/// Decides whether a connect to a target from the current task is redirected; on yes,
/// records the origin under the socket cookie.
fn should_redirect(
    ctx: &SockAddrContext,
    config: &RedirectConfig,
    orig_addr: [u32; 4],
    orig_port: u16,
    family: u16,
) -> bool {
    // SAFETY: the helper only reads the context it is given.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns_cookie == config.host_netns_cookie {
        bump(Counter::HostNamespace);
        return false;
    }
    // SAFETY: no arguments; allowed for cgroup sock_addr programs.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: read-only lookups; a racing update can at worst give a stale answer.
    if unsafe { BYPASS.get(&cgroup_id) }.is_some() {
        bump(Counter::Bypassed);
        return false;
    }
    // SAFETY: as above.
    if unsafe { FAILOPEN.get(&cgroup_id) }.is_some() {
        let last = HEARTBEAT.get(0).copied().unwrap_or(0);
        // SAFETY: no arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        if now.saturating_sub(last) > config.failopen_after_ns {
            bump(Counter::FailOpen);
            return false;
        }
    }
    // SAFETY: these helpers take no pointers (or only the context).
    let (cookie, pid_tgid) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_pid_tgid(),
        )
    };
    let origin = Origin {
        orig_addr,
        orig_port,
        family,
        tgid: (pid_tgid >> 32) as u32,
        cgroup_id,
        netns_cookie,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if SOCKETS.insert(&cookie, &origin, 0).is_err() {
        bump(Counter::MapErrors);
    }
    bump(Counter::Redirected);
    true
}

#[cgroup_sock_addr(connect4)]
pub fn chaperone_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_family != AF_INET || sa.type_ != SOCK_STREAM {
        return Ok(PROCEED);
    }
    let Some(config) = config() else {
        return Ok(PROCEED);
    };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let target = Target4 {
        addr: sa.user_ip4,
        port,
        pad: 0,
    };
    // SAFETY: read-only lookup.
    if unsafe { TARGETS.get(&target) }.is_none() {
        return Ok(PROCEED);
    }
    if should_redirect(ctx, config, [0, 0, 0, sa.user_ip4], port, FAMILY_V4) {
        sa.user_ip4 = config.proxy_addr;
        sa.user_port = u32::from(config.proxy_port.to_be());
    }
    Ok(PROCEED)
}

#[cgroup_sock_addr(connect6)]
pub fn chaperone_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_family != AF_INET6 || sa.type_ != SOCK_STREAM {
        return Ok(PROCEED);
    }
    let Some(config) = config() else {
        return Ok(PROCEED);
    };
    let port = u16::from_be(sa.user_port as u16);
    let ip6 = read_ip6(sa);
    let is_target = if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX {
        // A v4-mapped destination is an IPv4 connection in disguise.
        // SAFETY: read-only lookup.
        unsafe {
            TARGETS.get(&Target4 {
                addr: ip6[3],
                port,
                pad: 0,
            })
        }
        .is_some()
    } else {
        // SAFETY: read-only lookup.
        unsafe {
            TARGETS6.get(&Target6 {
                addr: ip6,
                port,
                pad: 0,
            })
        }
        .is_some()
    };
    if is_target && should_redirect(ctx, config, ip6, port, FAMILY_V6) {
        // The proxy listens on IPv4; a dual-stack socket reaches it through the mapped
        // address (an IPV6_V6ONLY socket cannot, and fails closed).
        write_ip6(sa, [0, 0, V4_MAPPED_PREFIX, config.proxy_addr]);
        sa.user_port = u32::from(config.proxy_port.to_be());
    }
    Ok(PROCEED)
}

#[cgroup_sock_addr(getpeername4)]
pub fn chaperone_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr; the helper only reads the socket.
    let (sa, cookie) = unsafe { (&mut *ctx.sock_addr, bpf_get_socket_cookie(ctx.as_ptr())) };
    // SAFETY: read-only lookup of a plain-old-data value.
    if let Some(origin) = unsafe { SOCKETS.get(&cookie) }
        && origin.family == FAMILY_V4
    {
        sa.user_ip4 = origin.orig_addr[3];
        sa.user_port = u32::from(origin.orig_port.to_be());
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn chaperone_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in getpeername4.
    let (sa, cookie) = unsafe { (&mut *ctx.sock_addr, bpf_get_socket_cookie(ctx.as_ptr())) };
    // SAFETY: read-only lookup of a plain-old-data value.
    if let Some(origin) = unsafe { SOCKETS.get(&cookie) }
        && origin.family == FAMILY_V6
    {
        write_ip6(sa, origin.orig_addr);
        sa.user_port = u32::from(origin.orig_port.to_be());
    }
    PROCEED
}

#[sock_ops]
pub fn chaperone_sockops(ctx: SockOpsContext) -> u32 {
    match try_sockops(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    ConnKey {
        client_addr: ctx.local_ip4(),
        proxy_addr: ctx.remote_ip4(),
        // local_port is in host byte order; remote_port holds the network-order port in
        // its upper 16 bits on little-endian machines, which u32::from_be undoes.
        client_port: ctx.local_port() as u16,
        proxy_port: u32::from_be(ctx.remote_port()) as u16,
    }
}

fn try_sockops(ctx: &SockOpsContext) -> Result<u32, u32> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return Ok(sk_action::SK_PASS);
    }
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return Ok(sk_action::SK_PASS);
    }
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-old-data value that is copied out at once.
    let Some(origin) = (unsafe { SOCKETS.get(&cookie) }).copied() else {
        return Ok(sk_action::SK_PASS);
    };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Redirected sockets always reach the proxy over IPv4 (IPv6 sockets through a
        // v4-mapped address), so the IPv4 view of the 4-tuple is what accept() reports.
        if CONNECTIONS.insert(&conn_key(ctx), &origin, 0).is_err() {
            bump(Counter::MapErrors);
        } else {
            bump(Counter::Attributed);
        }
        // Ask for state callbacks so both entries go away when the socket closes.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else if ctx.arg(1) == TCP_CLOSE {
        // The 4-tuple entry stays: the client may close before the proxy has accepted and
        // looked it up (a request sent with a FIN right behind it). Userspace removes it on
        // lookup, and the LRU bounds what is never looked up.
        let _ = SOCKETS.remove(&cookie);
        bump(Counter::Closed);
    }
    Ok(sk_action::SK_PASS)
}

#[cgroup_sock(sock_create)]
pub fn chaperone_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock for the program's lifetime.
    let sock = unsafe { &*ctx.sock };
    if sock.type_ != SOCK_RAW || (sock.family != AF_INET && sock.family != AF_INET6) {
        return PROCEED;
    }
    let Some(config) = config() else {
        return PROCEED;
    };
    // SAFETY: the helpers only read the socket behind the context.
    let (netns, cookie) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_socket_cookie(ctx.as_ptr()),
        )
    };
    if netns != config.host_netns_cookie && RAW_SOCKETS.insert(&cookie, &1, 0).is_err() {
        bump(Counter::MapErrors);
    }
    PROCEED
}

#[cgroup_skb(egress)]
pub fn chaperone_egress_guard(ctx: SkBuffContext) -> i32 {
    match try_egress_guard(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_egress_guard(ctx: &SkBuffContext) -> Result<i32, i32> {
    // SAFETY: the helper only reads the socket the packet belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup.
    if unsafe { RAW_SOCKETS.get(&cookie) }.is_none() {
        return Ok(PASS);
    }
    // cgroup_skb sees the packet from its network header.
    let first: u8 = ctx.load(0).map_err(|_| PASS)?;
    let hit = match first >> 4 {
        4 => {
            let daddr: u32 = ctx.load(16).map_err(|_| PASS)?;
            is_target4(daddr)
        }
        6 => {
            let daddr: [u32; 4] = ctx.load(24).map_err(|_| PASS)?;
            if daddr[0] == 0 && daddr[1] == 0 && daddr[2] == V4_MAPPED_PREFIX {
                is_target4(daddr[3])
            } else {
                is_target6(daddr)
            }
        }
        _ => false,
    };
    if hit {
        bump(Counter::GuardDrops);
        return Ok(DROP);
    }
    Ok(PASS)
}

/// Whether any target uses this IPv4 address. Raw packets are matched on the address
/// alone: a raw socket can speak any protocol and port to the API server.
fn is_target4(addr: u32) -> bool {
    // SAFETY: read-only lookup.
    unsafe {
        TARGETS.get(&Target4 {
            addr,
            port: 0,
            pad: 0,
        })
    }
    .is_some()
}

fn is_target6(addr: [u32; 4]) -> bool {
    // SAFETY: read-only lookup.
    unsafe {
        TARGETS6.get(&Target6 {
            addr,
            port: 0,
            pad: 0,
        })
    }
    .is_some()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
