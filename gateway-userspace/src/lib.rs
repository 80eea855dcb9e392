//! Chaperone: an eBPF-assisted, transparent gateway between AI agents running in Kubernetes
//! pods and the Kubernetes API server.
//!
//! Modules are named after subsystems, in data-flow order: the kernel redirect (`ebpf`),
//! TLS termination (`tls`), the L7 proxy (`proxy`), request understanding (`request`), the
//! policy decision (`policy`), recording (`recorder`). `app` wires them together; `config`,
//! `drain` and `cli` are the daemon's plumbing; `upstream` resolves the API server and the
//! gateway's credential for it through kube-rs.

pub mod admin;
pub mod alloc;
pub mod app;
pub mod approval;
pub mod cli;
pub mod config;
pub mod drain;
pub mod ebpf;
pub mod identity;
pub mod k8s;
pub mod masking;
pub mod policy;
pub mod protobuf;
pub mod proxy;
pub mod recorder;
pub mod request;
pub mod scope;
pub mod status;
pub mod tls;
pub mod upstream;

/// An error with its whole source chain (`outer: inner: root cause`): many libraries'
/// top-level messages omit the cause a person needs (the errno, the TLS alert).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
