//! Chaperone's kernel side.
//!
//! * `chaperone_connect4` (cgroup/connect4): a TCP connect() from a pod network namespace to
//!   an API server address is rewritten to the node-local proxy listener, and the original
//!   destination, cgroup id, netns cookie and calling process are remembered under the
//!   socket's cookie.
//! * `chaperone_sockops` (sock_ops): when such a socket starts its handshake, the record is
//!   re-keyed by the connection's 4-tuple, which is what the proxy knows after accept().
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, sk_action},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use gateway_common::{
    CONNECTIONS_MAX, COUNTERS_LEN, ConnKey, Counter, Origin, RedirectConfig, SOCKETS_MAX,
    TARGETS_MAX, Target4,
};

const AF_INET: u32 = 2;
const SOCK_STREAM: u32 = 1;

#[map(name = "CONFIG")]
static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

#[map(name = "TARGETS")]
static TARGETS: HashMap<Target4, u8> = HashMap::with_max_entries(TARGETS_MAX, 0);

#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<u64, Origin> = LruHashMap::with_max_entries(SOCKETS_MAX, 0);

#[map(name = "CONNECTIONS")]
static CONNECTIONS: LruHashMap<ConnKey, Origin> = LruHashMap::with_max_entries(CONNECTIONS_MAX, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Lets the connect() proceed (to the rewritten or the original address).
const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn chaperone_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and is only
        // touched by this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_family != AF_INET || sa.type_ != SOCK_STREAM {
        return Ok(PROCEED);
    }
    let Some(config) = CONFIG.get(0) else {
        return Ok(PROCEED);
    };
    if config.enabled == 0 {
        return Ok(PROCEED);
    }
    // user_port holds the port in network byte order in its low 16 bits.
    let orig_port = u16::from_be(sa.user_port as u16);
    let target = Target4 {
        addr: sa.user_ip4,
        port: orig_port,
        pad: 0,
    };
    // SAFETY: read-only lookup; a racing update can at worst give a stale answer.
    if unsafe { TARGETS.get(&target) }.is_none() {
        return Ok(PROCEED);
    }
    // SAFETY: the helper only reads the context it is given.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns_cookie == config.host_netns_cookie {
        bump(Counter::HostNamespace);
        return Ok(PROCEED);
    }
    // SAFETY: these helpers take no pointers (or only the context) and are allowed for
    // cgroup sock_addr programs.
    let (cookie, cgroup_id, pid_tgid) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
            bpf_get_current_pid_tgid(),
        )
    };
    let origin = Origin {
        orig_addr: sa.user_ip4,
        orig_port,
        pad: 0,
        cgroup_id,
        netns_cookie,
        tgid: (pid_tgid >> 32) as u32,
        pad2: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if SOCKETS.insert(&cookie, &origin, 0).is_err() {
        bump(Counter::MapErrors);
    }
    sa.user_ip4 = config.proxy_addr;
    sa.user_port = u32::from(config.proxy_port.to_be());
    bump(Counter::Redirected);
    Ok(PROCEED)
}

#[sock_ops]
pub fn chaperone_sockops(ctx: SockOpsContext) -> u32 {
    match try_sockops(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_sockops(ctx: &SockOpsContext) -> Result<u32, u32> {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB || ctx.family() != AF_INET {
        return Ok(sk_action::SK_PASS);
    }
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain-old-data value that is copied out at once.
    let Some(origin) = (unsafe { SOCKETS.get(&cookie) }).copied() else {
        return Ok(sk_action::SK_PASS);
    };
    let key = ConnKey {
        client_addr: ctx.local_ip4(),
        proxy_addr: ctx.remote_ip4(),
        // local_port is in host byte order; remote_port holds the network-order port in
        // its upper 16 bits on little-endian machines, which u32::from_be undoes.
        client_port: ctx.local_port() as u16,
        proxy_port: u32::from_be(ctx.remote_port()) as u16,
    };
    if CONNECTIONS.insert(&key, &origin, 0).is_err() {
        bump(Counter::MapErrors);
    } else {
        bump(Counter::Attributed);
    }
    let _ = SOCKETS.remove(&cookie);
    Ok(sk_action::SK_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
