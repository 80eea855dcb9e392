//! Test support for Chaperone, kept out of the product crate so that nothing here can
//! reach the released `chaperone` binary (not even through Cargo feature unification):
//! the Kubernetes API test server, the sandbox pod, the whole stack built from them,
//! identity fakes (an OIDC issuer, a TokenReview backend), the wire encoders tests speak
//! (protobuf, SPDY) and the demo.

pub mod apiserver;
pub mod demo;
pub mod local;
pub mod oidc;
pub mod protobuf;
pub mod sandbox;
pub mod spdy_frames;
pub mod stack;
pub mod tokenreview;
