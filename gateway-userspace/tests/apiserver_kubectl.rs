//! Real kubectl against the Kubernetes API test server.
