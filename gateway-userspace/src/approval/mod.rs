//! Just-in-time human approval: a request matched by a rule with `action: approve` waits
//! for a person, and silence means no.
//!
//! The parts, in the order a held request meets them:
//! * [`resource`]: the `AccessRequest` custom resource (`accessrequests.chaperone.dev`,
//!   v1alpha1) that stands for one held request. The gateway creates it through the API
//!   server with its own credential, in the gateway's namespace; every node's gateway
//!   watches them and releases its held requests when one is decided, whichever node's
//!   approvals API took the decision.
//! * [`seal`]: a decision counts only when it carries a seal, an HMAC-SHA256 keyed by a
//!   Secret only the gateways read, over the request's identity and the decision. The
//!   approvals API seals what it writes; a status edited directly through the API server
//!   has no valid seal, is ignored, and is recorded as a tampering attempt.
//! * [`holder`]: the gateway side: creates or reuses the AccessRequest of a held request,
//!   waits for a sealed decision (watching AccessRequests), releases, refuses or expires.

pub mod api;
pub mod client;
pub mod config;
pub mod holder;
pub mod notify;
pub mod resource;
pub mod seal;
pub mod used;

pub use config::ApprovalConfig;
