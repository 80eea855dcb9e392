//! Test-only helpers: the Kubernetes API test server and the sandbox pod.

pub mod apiserver;
pub mod sandbox;
