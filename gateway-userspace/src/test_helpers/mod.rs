//! Test-only helpers (feature `testing`): the Kubernetes API test server, the sandbox pod,
//! the full stack built from them, and `chaperone demo`.

pub mod apiserver;
pub mod demo;
pub mod local;
pub mod sandbox;
pub mod stack;
