//! Seals over approval decisions: only a gateway can write a decision other gateways
//! honour.
//!
//! Anyone with RBAC on `accessrequests/status` can write `phase: Approved`. A gateway
//! therefore acts on a decision only when `status.seal` is a valid HMAC-SHA256, keyed by
//! a Secret that only the gateways mount, over the object's identity (namespace, name,
//! uid, generation), a digest of its whole `spec` and the decision (phase, decider, time,
//! grant, comment). Each field is length-prefixed, so no two different decisions share a
//! sealed message; the uid ties a seal to one object, so a status copied onto another
//! request fails. The spec digest and the generation (which counts changes to the spec)
//! make a decision void if anything it decided on is edited afterwards: the grant's length
//! and scope, the rule, the requester, the approvers. The approvals API decides only on
//! requests whose spec is as the gateway created it (generation 1) and carries the
//! gateway's creation seal ([`SPEC_SEAL_ANNOTATION`]), so a request created by anyone
//! else, with a spec of their own, is never decided.

use std::path::Path;

use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use super::resource::{AccessRequest, AccessRequestStatus};

/// The annotation holding the seal a gateway puts on the spec of an AccessRequest it
/// creates ([`SealKey::seal_spec`]).
pub const SPEC_SEAL_ANNOTATION: &str = "chaperone.dev/spec-seal";

/// The shortest key accepted: 256 bits, the output size of the MAC.
pub const MIN_KEY_BYTES: usize = 32;

/// Why a seal is missing or wrong, or a key unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The key file could not be read.
    #[error("cannot read the approval seal key {path}: {reason}")]
    KeyUnreadable {
        /// The key file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The key is too short to be safe.
    #[error(
        "the approval seal key {path} holds {len} bytes; at least {MIN_KEY_BYTES} are needed (e.g. `head -c 32 /dev/urandom`)"
    )]
    KeyTooShort {
        /// The key file.
        path: String,
        /// Its length.
        len: usize,
    },
    /// The object has no uid (it was never stored by an API server).
    #[error("the AccessRequest has no metadata.uid")]
    NoUid,
    /// The status carries no seal.
    #[error("the decision carries no seal")]
    Missing,
    /// The seal is not base64 or does not match.
    #[error("the decision's seal does not match (not written by a gateway's approvals API)")]
    Mismatch,
}

/// The HMAC key shared by the gateways (a Kubernetes Secret mounted as a file).
#[derive(Clone)]
pub struct SealKey(Vec<u8>);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    /// A key from its bytes; shorter than [`MIN_KEY_BYTES`] is refused.
    pub fn new(bytes: Vec<u8>) -> Result<Self, SealError> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(SealError::KeyTooShort {
                path: "(in memory)".into(),
                len: bytes.len(),
            });
        }
        Ok(Self(bytes))
    }

    /// Reads the key file (its raw bytes, a trailing newline excluded).
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let mut bytes = std::fs::read(path).map_err(|e| SealError::KeyUnreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        Self::new(bytes).map_err(|e| match e {
            SealError::KeyTooShort { len, .. } => SealError::KeyTooShort {
                path: path.display().to_string(),
                len,
            },
            other => other,
        })
    }

    /// The seal for `status` (with its `seal` field ignored) on `request`.
    pub fn seal(
        &self,
        request: &AccessRequest,
        status: &AccessRequestStatus,
    ) -> Result<String, SealError> {
        let mac = self.mac(request, status)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// Checks the seal in `status` against `request`, in constant time.
    pub fn verify(
        &self,
        request: &AccessRequest,
        status: &AccessRequestStatus,
    ) -> Result<(), SealError> {
        let seal = status.seal.as_deref().ok_or(SealError::Missing)?;
        let tag = base64::engine::general_purpose::STANDARD
            .decode(seal)
            .map_err(|_| SealError::Mismatch)?;
        self.mac(request, status)?
            .verify_slice(&tag)
            .map_err(|_| SealError::Mismatch)
    }

    /// The seal a gateway puts on an AccessRequest it creates
    /// ([`SPEC_SEAL_ANNOTATION`]): an HMAC over its namespace and a digest of its spec.
    /// Without it, anyone allowed to create AccessRequests could write a spec of their own
    /// (themselves as approvers, a grant of years, another workload) and decide it.
    pub fn seal_spec(&self, request: &AccessRequest) -> Result<String, SealError> {
        Ok(base64::engine::general_purpose::STANDARD
            .encode(self.spec_mac(request)?.finalize().into_bytes()))
    }

    /// Checks [`Self::seal_spec`]'s annotation on `request`, in constant time.
    pub fn verify_spec(&self, request: &AccessRequest) -> Result<(), SealError> {
        let seal = request
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SPEC_SEAL_ANNOTATION))
            .ok_or(SealError::Missing)?;
        let tag = base64::engine::general_purpose::STANDARD
            .decode(seal)
            .map_err(|_| SealError::Mismatch)?;
        self.spec_mac(request)?
            .verify_slice(&tag)
            .map_err(|_| SealError::Mismatch)
    }

    fn spec_mac(&self, request: &AccessRequest) -> Result<Hmac<Sha256>, SealError> {
        // `new_from_slice` accepts any key length for HMAC; the error is unreachable.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).map_err(|_| SealError::Mismatch)?;
        let spec = spec_digest(request);
        for field in [
            "chaperone.dev/v1alpha1 AccessRequest spec v1",
            request.metadata.namespace.as_deref().unwrap_or(""),
            spec.as_str(),
        ] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field.as_bytes());
        }
        Ok(mac)
    }

    fn mac(
        &self,
        request: &AccessRequest,
        status: &AccessRequestStatus,
    ) -> Result<Hmac<Sha256>, SealError> {
        let uid = request.metadata.uid.as_deref().ok_or(SealError::NoUid)?;
        // `new_from_slice` accepts any key length for HMAC; the error is unreachable.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).map_err(|_| SealError::Mismatch)?;
        let generation = request
            .metadata
            .generation
            .map(|g| g.to_string())
            .unwrap_or_default();
        let spec = spec_digest(request);
        let fields: [&str; 11] = [
            "chaperone.dev/v1alpha1 AccessRequest decision v2",
            request.metadata.namespace.as_deref().unwrap_or(""),
            request.metadata.name.as_deref().unwrap_or(""),
            uid,
            &generation,
            &spec,
            status.phase.as_str(),
            status.decided_by.as_deref().unwrap_or(""),
            status.decided_at.as_deref().unwrap_or(""),
            status.grant_until.as_deref().unwrap_or(""),
            status.comment.as_deref().unwrap_or(""),
        ];
        for field in fields {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field.as_bytes());
        }
        Ok(mac)
    }
}

/// Hex SHA-256 of the spec as this version of the type serialises it: fields in
/// declaration order, defaults filled in, unknown fields dropped, so a spec read back from
/// the API server digests as the one the gateway wrote.
fn spec_digest(request: &AccessRequest) -> String {
    use sha2::Digest as _;
    // Serialising plain structs of strings cannot fail; an empty input would still differ
    // from every real spec's digest.
    let json = serde_json::to_vec(&request.spec).unwrap_or_default();
    Sha256::digest(&json)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::resource::{AccessRequestSpec, Phase};

    fn request(uid: &str) -> AccessRequest {
        let mut r = AccessRequest::new(
            "ar-1",
            AccessRequestSpec {
                requester: Default::default(),
                request: Default::default(),
                fingerprint: "f00d".into(),
                rule: "scale-prod".into(),
                approvers: Default::default(),
                grant: Default::default(),
                node: "node-a".into(),
                created_at: "2026-12-03T20:00:00Z".into(),
                expires_at: "2026-12-03T20:05:00Z".into(),
            },
        );
        r.metadata.namespace = Some("chaperone".into());
        r.metadata.uid = Some(uid.into());
        r.metadata.generation = Some(1);
        r
    }

    fn approved() -> AccessRequestStatus {
        AccessRequestStatus {
            phase: Phase::Approved,
            decided_by: Some("alice".into()),
            decided_at: Some("2026-12-03T20:01:00Z".into()),
            ..Default::default()
        }
    }

    fn key(byte: u8) -> SealKey {
        SealKey::new(vec![byte; 32]).unwrap()
    }

    #[test]
    fn a_sealed_decision_verifies() {
        let r = request("u1");
        let mut status = approved();
        status.seal = Some(key(1).seal(&r, &status).unwrap());
        assert_eq!(key(1).verify(&r, &status), Ok(()));
    }

    #[test]
    fn any_change_breaks_the_seal() {
        let r = request("u1");
        let mut status = approved();
        status.seal = Some(key(1).seal(&r, &status).unwrap());
        assert_eq!(key(2).verify(&r, &status), Err(SealError::Mismatch));
        assert_eq!(
            key(1).verify(&request("u2"), &status),
            Err(SealError::Mismatch)
        );
        let mut denied = status.clone();
        denied.phase = Phase::Denied;
        assert_eq!(key(1).verify(&r, &denied), Err(SealError::Mismatch));
        let mut other_decider = status.clone();
        other_decider.decided_by = Some("mallory".into());
        assert_eq!(key(1).verify(&r, &other_decider), Err(SealError::Mismatch));
        // Every part of the spec is sealed: what was asked, the grant, the rule, who asked
        // and who may decide; and so is the generation that counts edits to it.
        let edits: [fn(&mut AccessRequest); 7] = [
            |r| r.spec.fingerprint = "beef".into(),
            |r| r.spec.grant.duration = Some("87600h".into()),
            |r| r.spec.grant.scope = crate::approval::resource::GrantScope::Rule,
            |r| r.spec.rule = "anything-goes".into(),
            |r| r.spec.requester.principal = Some("someone-else".into()),
            |r| r.spec.approvers.users.push("mallory".into()),
            |r| r.metadata.generation = Some(2),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut edited = r.clone();
            edit(&mut edited);
            assert_eq!(
                key(1).verify(&edited, &status),
                Err(SealError::Mismatch),
                "edit {i}"
            );
        }
        // Moving characters between fields must not keep the seal (length prefixes).
        let mut shifted = status.clone();
        shifted.decided_by = Some("alice2026-12-03T20:01:00Z".into());
        shifted.decided_at = Some(String::new());
        assert_eq!(key(1).verify(&r, &shifted), Err(SealError::Mismatch));
    }

    #[test]
    fn missing_or_garbage_seals_are_refused() {
        let r = request("u1");
        let mut status = approved();
        assert_eq!(key(1).verify(&r, &status), Err(SealError::Missing));
        status.seal = Some("not base64 !!".into());
        assert_eq!(key(1).verify(&r, &status), Err(SealError::Mismatch));
        let mut no_uid = r.clone();
        no_uid.metadata.uid = None;
        assert_eq!(key(1).seal(&no_uid, &status), Err(SealError::NoUid));
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(matches!(
            SealKey::new(vec![0; 31]),
            Err(SealError::KeyTooShort { len: 31, .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(
            &path,
            [7u8; 32].iter().chain(b"\n").copied().collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(SealKey::from_file(&path).is_ok());
        assert!(matches!(
            SealKey::from_file(&dir.path().join("absent")),
            Err(SealError::KeyUnreadable { .. })
        ));
    }
}
