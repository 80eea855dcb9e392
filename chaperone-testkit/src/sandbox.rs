//! A sandbox "pod" made of the same kernel objects a real pod is: its own cgroup v2
//! directory, its own network namespace, and a veth pair to the node.
//!
//! Addresses come from a link-local /24 the sandbox picks and owns (169.254.X.0/24): the
//! node side is `.1`, the pod side `.2`, and `.100` is a *virtual API server address*
//! that nothing answers for. The pod namespace has no default route, so a connection that
//! the eBPF redirect missed fails locally instead of leaving the machine.
//!
//! Everything is removed on drop, and [`cleanup_stale`] removes what an earlier, killed run
//! left behind (names carry the creating process id).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
};

/// Prefix of bpffs pin directories that tests, the demo and benchmarks create, followed by
/// the creating process id; [`cleanup_stale`] removes those of dead processes.
pub const TEST_PIN_PREFIX: &str = "chaperone-sandbox-";

/// Name prefix of every network namespace a sandbox creates.
const NETNS_PREFIX: &str = "chp-";
/// cgroup directory (below the cgroup2 root) holding all sandbox cgroups.
const CGROUP_PARENT: &str = "chaperone-sandbox";

/// Errors creating a sandbox; each names the command or file that failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A command could not be run or failed.
    #[error("`{command}` failed: {message}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr or the spawn error.
        message: String,
    },
    /// A cgroup file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No free 169.254.X.0/24 subnet.
    #[error("no free 169.254.X.0/24 subnet for a sandbox")]
    NoSubnet,
    /// Could not find the cgroup2 mount.
    #[error(transparent)]
    Cgroup(#[from] gateway_userspace::ebpf::EbpfError),
}

fn run(program: &str, args: &[&str]) -> Result<String, SandboxError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| SandboxError::Command {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SandboxError::Command {
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A sandbox pod. Dropping it kills its processes and removes its cgroup, namespace and veth.
#[derive(Debug)]
pub struct SandboxPod {
    netns: String,
    host_veth: String,
    pod_veth: String,
    /// The cgroup processes run in (the container's, for a kubelet-style sandbox).
    cgroup: PathBuf,
    /// The sandbox's own directory below `chaperone-sandbox/`, removed with everything in it.
    cgroup_base: PathBuf,
    subnet: u8,
}

/// Where a sandbox's cgroup sits below its own directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Directly in the sandbox directory.
    Plain,
    /// Where kubelet's systemd cgroup driver puts a containerd container of a BestEffort
    /// pod: `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
    /// cri-containerd-<id>.scope`, so identity resolution sees a real pod layout.
    Kubelet {
        /// The pod's UID.
        pod_uid: String,
        /// The container id (64 hex digits for containerd).
        container_id: String,
    },
}

impl SandboxPod {
    /// Creates the cgroup, network namespace and veth pair. Needs root.
    pub fn create() -> Result<Self, SandboxError> {
        Self::create_with(CgroupLayout::Plain)
    }

    /// Like [`Self::create`], with the cgroup in the given layout.
    pub fn create_with(layout: CgroupLayout) -> Result<Self, SandboxError> {
        let token = uuid::Uuid::now_v7().as_u128() as u32 & 0x00ff_ffff;
        let pid = std::process::id();
        let netns = format!("{NETNS_PREFIX}{pid}-{token:06x}");
        let host_veth = format!("chp{token:06x}h");
        let pod_veth = format!("chp{token:06x}p");
        let root = gateway_userspace::ebpf::cgroup2_mount()?;
        let cgroup_base = root.join(CGROUP_PARENT).join(format!("{pid}-{token:06x}"));
        let cgroup = match &layout {
            CgroupLayout::Plain => cgroup_base.clone(),
            CgroupLayout::Kubelet {
                pod_uid,
                container_id,
            } => cgroup_base
                .join("kubepods.slice/kubepods-besteffort.slice")
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    pod_uid.replace('-', "_")
                ))
                .join(format!("cri-containerd-{container_id}.scope")),
        };

        // Partially built sandboxes are torn down by Drop from here on.
        let mut pod = Self {
            netns,
            host_veth,
            pod_veth: pod_veth.clone(),
            cgroup,
            cgroup_base,
            subnet: 0,
        };
        std::fs::create_dir_all(&pod.cgroup).map_err(|source| SandboxError::Io {
            path: pod.cgroup.clone(),
            source,
        })?;
        run("ip", &["netns", "add", &pod.netns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &pod.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &pod_veth,
            ],
        )?;
        run("ip", &["link", "set", &pod_veth, "netns", &pod.netns])?;
        pod.subnet = pick_subnet()?;
        let host_cidr = format!("{}/24", pod.host_ip());
        let pod_cidr = format!("{}/24", pod.pod_ip());
        run("ip", &["addr", "add", &host_cidr, "dev", &pod.host_veth])?;
        run("ip", &["link", "set", &pod.host_veth, "up"])?;
        let ns = pod.netns.clone();
        run(
            "ip",
            &["-n", &ns, "addr", "add", &pod_cidr, "dev", &pod_veth],
        )?;
        run("ip", &["-n", &ns, "link", "set", &pod_veth, "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(pod)
    }

    /// The node-side address (where the gateway listens for this pod).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(169, 254, self.subnet, 1)
    }

    /// The pod's own address.
    pub fn pod_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(169, 254, self.subnet, 2)
    }

    /// A virtual API server address inside the sandbox's subnet that nothing answers for.
    pub fn virtual_api_server(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(169, 254, self.subnet, 100), 443)
    }

    /// Gives the pod IPv6 too: `fd77:<X>::2/64` on its side, `fd77:<X>::1/64` on the node's.
    pub fn enable_ipv6(&self) -> Result<(), SandboxError> {
        let pod_veth = &self.pod_veth;
        let (host, pod) = (
            format!("{}/64", self.host_ip6()),
            format!("{}/64", self.pod_ip6()),
        );
        run(
            "ip",
            &["-6", "addr", "add", &host, "dev", &self.host_veth, "nodad"],
        )?;
        run(
            "ip",
            &[
                "-n",
                &self.netns,
                "-6",
                "addr",
                "add",
                &pod,
                "dev",
                pod_veth,
                "nodad",
            ],
        )?;
        Ok(())
    }

    /// The node-side IPv6 address (after [`Self::enable_ipv6`]).
    pub fn host_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, u16::from(self.subnet), 0, 0, 0, 0, 0, 1)
    }

    /// The pod's IPv6 address (after [`Self::enable_ipv6`]).
    pub fn pod_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, u16::from(self.subnet), 0, 0, 0, 0, 0, 2)
    }

    /// A virtual IPv6 API server address inside the pod's IPv6 subnet.
    pub fn virtual_api_server6(&self) -> SocketAddrV6 {
        SocketAddrV6::new(
            Ipv6Addr::new(0xfd77, u16::from(self.subnet), 0, 0, 0, 0, 0, 0x100),
            443,
            0,
            0,
        )
    }

    /// Lets the pod reach `ip` (an address of the node) through its veth, as pods reach
    /// their node's address in a cluster.
    pub fn route_to(&self, ip: Ipv4Addr) -> Result<(), SandboxError> {
        let pod_veth = &self.pod_veth;
        run(
            "ip",
            &[
                "-n",
                &self.netns,
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                pod_veth,
            ],
        )?;
        Ok(())
    }

    /// Makes the virtual API server address real on the node side, so a connection that is
    /// *not* redirected reaches a listener the test owns instead of failing.
    pub fn claim_virtual_api_server(&self) -> Result<(), SandboxError> {
        let ip = format!("{}/32", self.virtual_api_server().ip());
        run("ip", &["addr", "add", &ip, "dev", &self.host_veth])?;
        Ok(())
    }

    /// The network namespace's name (`ip netns`), usable as `/run/netns/<name>`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The pod's cgroup directory.
    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// The pod's cgroup path relative to the cgroup2 mount (as identity resolution sees it).
    pub fn cgroup_relative_path(&self) -> Result<String, SandboxError> {
        let root = gateway_userspace::ebpf::cgroup2_mount()?;
        Ok(self
            .cgroup
            .strip_prefix(&root)
            .unwrap_or(&self.cgroup)
            .display()
            .to_string())
    }

    /// The pod's cgroup id, as `bpf_get_current_cgroup_id()` reports it.
    pub fn cgroup_id(&self) -> Result<u64, SandboxError> {
        std::fs::metadata(&self.cgroup)
            .map(|m| m.ino())
            .map_err(|source| SandboxError::Io {
                path: self.cgroup.clone(),
                source,
            })
    }

    /// A command that runs `program` inside the pod: the shell moves itself into the pod's
    /// cgroup first (so the kernel attributes every socket to it), then enters the network
    /// namespace and execs the program.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"cg="$1"; ns="$2"; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter --net="/run/netns/$ns" -- "$@""#)
            .arg("sandbox")
            .arg(&self.cgroup)
            .arg(&self.netns)
            .arg(program);
        cmd
    }
}

impl Drop for SandboxPod {
    fn drop(&mut self) {
        teardown(&self.cgroup_base, &self.netns, &self.host_veth);
    }
}

fn teardown(cgroup: &Path, netns: &str, host_veth: &str) {
    remove_cgroup_tree(cgroup);
    // Deleting the namespace removes the pod end of the veth, which removes the pair.
    let _ = run("ip", &["netns", "del", netns]);
    let _ = run("ip", &["link", "del", host_veth]);
}

/// Kills every process in a cgroup subtree and removes its directories, deepest first.
fn remove_cgroup_tree(cgroup: &Path) {
    // cgroup.kill (Linux 5.14) kills every process in the subtree at once.
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    let mut dirs = vec![cgroup.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        i += 1;
    }
    for dir in dirs.iter().rev() {
        for _ in 0..50 {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // Killed processes take a moment to leave the cgroup.
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }
}

fn pick_subnet() -> Result<u8, SandboxError> {
    let used = run("ip", &["-4", "-o", "addr", "show"])?;
    let start = (uuid::Uuid::now_v7().as_u128() as u8) % 200;
    (0..200u8)
        .map(|i| 20 + (start.wrapping_add(i) % 200))
        .find(|x| !used.contains(&format!(" 169.254.{x}.")))
        .ok_or(SandboxError::NoSubnet)
}

/// Removes sandboxes (and bpffs pins) left behind by processes that no longer exist.
pub fn cleanup_stale() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(TEST_PIN_PREFIX)
                && let Some(pid) = rest.split('-').next()
                && !alive(pid)
            {
                let _ = gateway_userspace::ebpf::uninstall(&entry.path());
            }
        }
    }
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            let Some((pid, token)) = rest.split_once('-') else {
                continue;
            };
            if !alive(pid) {
                let cgroup = gateway_userspace::ebpf::cgroup2_mount()
                    .map(|r| r.join(CGROUP_PARENT).join(format!("{pid}-{token}")))
                    .unwrap_or_default();
                teardown(&cgroup, name, &format!("chp{token}h"));
            }
        }
    }
    if let Ok(root) = gateway_userspace::ebpf::cgroup2_mount()
        && let Ok(entries) = std::fs::read_dir(root.join(CGROUP_PARENT))
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((pid, _)) = name.split_once('-')
                && !alive(pid)
            {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
}
