//! Token verification against an in-process OIDC issuer and a fake TokenReview.

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use http::HeaderValue;
use serde_json::json;

use chaperone_testkit::{
    oidc::{TestIssuer, TestKey},
    tokenreview::FakeTokenReviewer,
};
use gateway_userspace::identity::{
    TokenReviewer, WorkloadIdentity,
    oidc::OidcVerifier,
    principal::{Principal, PrincipalKind, PrincipalVerifier, TokenMemo, service_account_mismatch},
};

const CLIENT: &str = "chaperone";

fn bearer(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {token}")).unwrap_or_else(|e| panic!("{e}"))
}

fn workload(namespace: &str, sa: &str) -> WorkloadIdentity {
    WorkloadIdentity {
        node: "node-a".to_owned(),
        namespace: Some(namespace.to_owned()),
        pod: Some("agent-0".to_owned()),
        service_account: Some(sa.to_owned()),
        ..WorkloadIdentity::default()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn verifier_for(
    issuer: &TestIssuer,
    reviewer: Option<Arc<FakeTokenReviewer>>,
) -> PrincipalVerifier {
    let oidc = OidcVerifier::new(issuer.config(CLIENT))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_refresh_min_interval(Duration::ZERO);
    PrincipalVerifier::new(
        vec![oidc],
        reviewer.map(|r| r as Arc<dyn TokenReviewer>),
        Duration::from_secs(60),
    )
}

fn expect_invalid(p: &Principal, want: &str, case: &str) {
    assert_eq!(p.kind, PrincipalKind::Invalid, "{case}: {p:?}");
    let reason = p.reason.as_deref().unwrap_or("");
    assert!(
        reason.contains(want),
        "{case}: reason {reason:?} lacks {want:?}"
    );
    assert_eq!(p.subject, None, "{case}");
}

#[tokio::test]
async fn oidc_tokens_are_verified_not_trusted() {
    let rsa = TestKey::rs256("rsa-1", 0);
    let ec = TestKey::es256("ec-1");
    let issuer = TestIssuer::start(&[&rsa, &ec]).await;
    let verifier = verifier_for(&issuer, None).await;
    let w = workload("agents", "agent");
    let now = jsonwebtoken::get_current_timestamp();

    // Valid RS256 and ES256 tokens, with groups.
    for key in [&rsa, &ec] {
        let mut claims = issuer.claims("alice", CLIENT);
        claims["groups"] = json!(["dev", "ops"]);
        let p = verifier.verify(Some(&bearer(&key.sign(&claims))), &w).await;
        assert_eq!(p.kind, PrincipalKind::Oidc, "{:?}: {p:?}", key.alg);
        assert_eq!(
            p.subject,
            Some(format!("{}#alice", issuer.url)),
            "default prefix"
        );
        assert_eq!(p.groups, ["dev", "ops"]);
        assert_eq!(p.mismatch, None);
    }
    // aud as a list containing the client id.
    let mut claims = issuer.claims("bob", CLIENT);
    claims["aud"] = json!(["other", CLIENT]);
    let p = verifier.verify(Some(&bearer(&rsa.sign(&claims))), &w).await;
    assert_eq!(p.kind, PrincipalKind::Oidc, "{p:?}");

    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = issuer.claims("mallory", CLIENT);
        f(&mut c);
        rsa.sign(&c)
    };
    let valid = with(&|_| {});
    let (head, rest) = valid.split_once('.').unwrap_or_else(|| panic!("jwt"));
    let (payload, signature) = rest.split_once('.').unwrap_or_else(|| panic!("jwt"));
    let mut sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(signature)
        .unwrap_or_else(|e| panic!("{e}"));
    sig[10] ^= 0x01;
    let bad_signature = format!("{head}.{payload}.{}", b64(&sig));
    // A payload swapped under a valid signature.
    let other_payload = b64(
        json!({"iss": issuer.url, "aud": CLIENT, "sub": "admin", "exp": now + 300})
            .to_string()
            .as_bytes(),
    );
    let swapped = format!("{head}.{other_payload}.{signature}");
    let none = format!(
        "{}.{payload}.",
        b64(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes())
    );
    // HS256 keyed with the RSA public key (the classic algorithm-confusion attack).
    let public = serde_json::to_string(rsa.jwk()).unwrap_or_else(|e| panic!("{e}"));
    let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = Some(rsa.kid.clone());
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &issuer.claims("mallory", CLIENT),
        &jsonwebtoken::EncodingKey::from_secret(public.as_bytes()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let unsigned_key = TestKey::rs256("rsa-1", 1); // same kid, key the issuer never published

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            with(&|c| {
                c["exp"] = json!(now - 120);
                c["nbf"] = json!(now - 600);
            }),
            "expired",
        ),
        (
            "not yet valid",
            with(&|c| {
                c["nbf"] = json!(now + 600);
                c["exp"] = json!(now + 900);
            }),
            "not valid yet",
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!("someone-else")),
            "audience",
        ),
        (
            "no audience",
            with(&|c| {
                c.as_object_mut().map(|o| o.remove("aud"));
            }),
            "aud",
        ),
        (
            "no exp",
            with(&|c| {
                c.as_object_mut().map(|o| o.remove("exp"));
            }),
            "exp",
        ),
        ("bad signature", bad_signature, "signature"),
        ("swapped payload", swapped, "signature"),
        ("alg none", none, "'none' is not accepted"),
        ("HS256 with public key", hs256, "'HS256' is not accepted"),
        (
            "unpublished key",
            unsigned_key.sign(&issuer.claims("mallory", CLIENT)),
            "signature",
        ),
        (
            "garbage",
            "not-a-jwt".to_owned(),
            "TokenReview is not enabled",
        ),
        (
            "two parts",
            format!("{head}.{payload}"),
            "three dot-separated parts",
        ),
        (
            "bad sub type",
            with(&|c| c["sub"] = json!(42)),
            "username claim 'sub'",
        ),
        (
            "bad groups",
            with(&|c| c["groups"] = json!({"a": 1})),
            "groups claim",
        ),
    ];
    for (case, token, want) in cases {
        let p = verifier.verify(Some(&bearer(&token)), &w).await;
        expect_invalid(&p, want, case);
        assert!(!p.is_unverifiable(), "{case}: refused, not unverifiable");
    }

    // Within the 60 s skew, a just-expired token is still accepted.
    let p = verifier
        .verify(
            Some(&bearer(&with(&|c| {
                c["exp"] = json!(now - 30);
                c["nbf"] = json!(now - 600);
            }))),
            &w,
        )
        .await;
    assert_eq!(p.kind, PrincipalKind::Oidc, "skew: {p:?}");
}

#[tokio::test]
async fn a_token_for_another_issuer_is_not_verified_with_ours() {
    let key = TestKey::rs256("k", 0);
    let ours = TestIssuer::start(&[&key]).await;
    let theirs = TestIssuer::start(&[&key]).await;
    let verifier = verifier_for(&ours, None).await;
    // Same key, but `iss` is another issuer: it must not pass as ours.
    let token = key.sign(&theirs.claims("eve", CLIENT));
    let p = verifier
        .verify(Some(&bearer(&token)), &workload("a", "b"))
        .await;
    expect_invalid(&p, "not a configured OIDC issuer", "wrong issuer");
    // And a direct check of the issuer validation inside the OIDC verifier.
    let direct = OidcVerifier::new(ours.config(CLIENT)).unwrap_or_else(|e| panic!("{e}"));
    let err = direct
        .verify(&token)
        .await
        .expect_err("iss of another issuer");
    assert!(err.to_string().contains("issuer"), "{err}");
}

#[tokio::test]
async fn key_rotation_refetches_on_unknown_kid_with_a_rate_limit() {
    let old = TestKey::rs256("2024", 0);
    let new = TestKey::es256("2025");
    let issuer = TestIssuer::start(&[&old]).await;
    let oidc = OidcVerifier::new(issuer.config(CLIENT))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_refresh_min_interval(Duration::from_millis(1000));
    let verifier = PrincipalVerifier::new(vec![oidc], None, Duration::from_secs(60));
    let w = workload("a", "b");
    // Sign everything up front: RSA signing in a debug build is slow enough to blur the
    // rate-limit window.
    let made_up: Vec<String> = (0..20)
        .map(|i| TestKey::rs256(&format!("made-up-{i}"), 1).sign(&issuer.claims("x", CLIENT)))
        .collect();
    let rotated = new.sign(&issuer.claims("u3", CLIENT));
    let retired = old.sign(&issuer.claims("u4", CLIENT));

    let p = verifier
        .verify(Some(&bearer(&old.sign(&issuer.claims("u1", CLIENT)))), &w)
        .await;
    assert_eq!(p.kind, PrincipalKind::Oidc, "{p:?}");
    assert_eq!(issuer.jwks_requests(), 1);
    // Known kid: no refetch.
    let p = verifier
        .verify(Some(&bearer(&old.sign(&issuer.claims("u2", CLIENT)))), &w)
        .await;
    assert_eq!(p.kind, PrincipalKind::Oidc, "{p:?}");
    assert_eq!(issuer.jwks_requests(), 1, "a known kid must not refetch");

    // The issuer rotates; a token with the new kid right away is within the rate limit.
    issuer.publish(&[&new]);
    let p = verifier.verify(Some(&bearer(&rotated)), &w).await;
    expect_invalid(&p, "no ES256 key with kid '2025'", "rate-limited refetch");
    assert_eq!(issuer.jwks_requests(), 1);
    // A flood of made-up kids does not fetch either.
    for token in &made_up {
        let p = verifier.verify(Some(&bearer(token)), &w).await;
        assert_eq!(p.kind, PrincipalKind::Invalid);
    }
    assert_eq!(
        issuer.jwks_requests(),
        1,
        "unknown kids must be rate-limited"
    );

    // After the interval the same token verifies: the rejection above was not cached.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let p = verifier.verify(Some(&bearer(&rotated)), &w).await;
    assert_eq!(p.kind, PrincipalKind::Oidc, "{p:?}");
    assert_eq!(issuer.jwks_requests(), 2);
    // The old key is gone from the JWKS: a fresh token signed with it fails.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let p = verifier.verify(Some(&bearer(&retired)), &w).await;
    expect_invalid(&p, "kid '2024'", "retired key");
}

#[tokio::test]
async fn unreachable_issuer_is_invalid_but_not_cached() {
    let key = TestKey::rs256("k", 0);
    let issuer = TestIssuer::start(&[&key]).await;
    issuer.publish_raw(json!({"keys": "not a list"}));
    let verifier = verifier_for(&issuer, None).await;
    let token = key.sign(&issuer.claims("u", CLIENT));
    let p = verifier
        .verify(Some(&bearer(&token)), &workload("a", "b"))
        .await;
    expect_invalid(&p, "/keys", "broken JWKS");
    assert!(
        p.is_unverifiable(),
        "the issuer's keys could not be read: {p:?}"
    );
    assert_eq!(
        verifier.cached_entries(),
        0,
        "transient failures must not be cached"
    );
    // Keys of unsupported types are skipped, the usable one still verifies.
    let mut jwks = json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "k", "alg": "HS256"},
        {"kty": "RSA", "kid": "k", "use": "enc", "n": "AQAB", "e": "AQAB"},
    ]});
    if let Some(keys) = jwks["keys"].as_array_mut() {
        keys.push(serde_json::to_value(key.jwk()).unwrap_or_else(|e| panic!("{e}")));
    }
    issuer.publish_raw(jwks);
    let p = verifier
        .verify(Some(&bearer(&token)), &workload("a", "b"))
        .await;
    assert_eq!(p.kind, PrincipalKind::Oidc, "{p:?}");
}

/// A failed discovery/JWKS fetch is named as the cause for as long as the rate limit holds
/// back the next one, not hidden behind "no key with kid".
#[tokio::test]
async fn a_failed_key_fetch_is_named_as_the_cause_until_the_next_attempt() {
    let key = TestKey::rs256("k1", 0);
    let issuer = TestIssuer::start(&[&key]).await;
    issuer.publish_raw(json!({"keys": "not a list"}));
    let oidc = OidcVerifier::new(issuer.config(CLIENT))
        .unwrap_or_else(|e| panic!("{e}"))
        .with_refresh_min_interval(Duration::from_millis(600));
    let verifier = PrincipalVerifier::new(vec![oidc], None, Duration::from_secs(60));
    let w = workload("a", "b");
    let first = key.sign(&issuer.claims("u1", CLIENT));
    let second = key.sign(&issuer.claims("u2", CLIENT));
    let p = verifier.verify(Some(&bearer(&first)), &w).await;
    expect_invalid(&p, "/keys", "the failed fetch");
    let p = verifier.verify(Some(&bearer(&second)), &w).await;
    expect_invalid(&p, "/keys", "within the rate limit, the same cause");
    let reason = p.reason.clone().unwrap_or_default();
    assert!(
        !reason.contains("no RS256 key"),
        "the cause is hidden: {reason}"
    );
    assert_eq!(issuer.jwks_requests(), 1, "rate-limited");

    // The issuer is fixed: after the interval the token verifies.
    issuer.publish(&[&key]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let p = verifier.verify(Some(&bearer(&second)), &w).await;
    assert_eq!(p.kind, PrincipalKind::Oidc, "{p:?}");

    // Keys held, the issuer rotates and its JWKS breaks: the unknown kid names both.
    let rotated = TestKey::rs256("k2", 1).sign(&issuer.claims("u3", CLIENT));
    issuer.publish_raw(json!({"keys": "not a list"}));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let p = verifier.verify(Some(&bearer(&rotated)), &w).await;
    expect_invalid(&p, "no RS256 key with kid 'k2'", "unknown kid");
    expect_invalid(
        &p,
        "fetching a newer one failed",
        "unknown kid, failed refresh",
    );
}

#[tokio::test]
async fn username_and_groups_claims_and_prefixes() {
    let key = TestKey::es256("k");
    let issuer = TestIssuer::start(&[&key]).await;
    // (usernamePrefix, usernameClaim, groupsPrefix, extra claims, user and groups or error)
    type Case<'a> = (
        Option<&'a str>,
        &'a str,
        Option<&'a str>,
        serde_json::Value,
        Result<(&'a str, Vec<&'a str>), &'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            Some("oidc:"),
            "sub",
            Some("g:"),
            json!({"groups": ["a", "b"]}),
            Ok(("oidc:alice", vec!["g:a", "g:b"])),
        ),
        (
            Some("-"),
            "sub",
            None,
            json!({"groups": "solo"}),
            Ok(("alice", vec!["solo"])),
        ),
        (
            None,
            "email",
            None,
            json!({"email": "a@example.com", "email_verified": true}),
            Ok(("a@example.com", vec![])),
        ),
        (
            None,
            "email",
            None,
            json!({"email": "a@example.com", "email_verified": false}),
            Err("email is not verified"),
        ),
        (
            None,
            "email",
            None,
            json!({}),
            Err("username claim 'email'"),
        ),
    ];
    for (prefix, claim, groups_prefix, extra, want) in cases {
        let mut config = issuer.config(CLIENT);
        config.username_prefix = prefix.map(str::to_owned);
        config.username_claim = claim.to_owned();
        config.groups_prefix = groups_prefix.map(str::to_owned);
        let verifier = OidcVerifier::new(config).unwrap_or_else(|e| panic!("{e}"));
        let mut claims = issuer.claims("alice", CLIENT);
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let got = verifier.verify(&key.sign(&claims)).await;
        match want {
            Ok((user, groups)) => {
                let user_got = got.unwrap_or_else(|e| panic!("{claim}/{prefix:?}: {e}"));
                assert_eq!(user_got.username, user);
                assert_eq!(user_got.groups, groups);
            }
            Err(reason) => {
                let err = got.expect_err(reason);
                assert!(err.to_string().contains(reason), "{err}");
            }
        }
    }
}

#[tokio::test]
async fn service_account_tokens_go_to_token_review_and_are_cached_by_hash() {
    let key = TestKey::rs256("k", 0);
    let issuer = TestIssuer::start(&[&key]).await;
    let reviewer = Arc::new(FakeTokenReviewer::new());
    // A ServiceAccount-style JWT from the cluster's issuer, and an opaque token.
    let sa_token = key.sign(&json!({"iss": "https://kubernetes.default.svc.cluster.local", "sub": "system:serviceaccount:agents:agent", "exp": jsonwebtoken::get_current_timestamp() + 600}));
    reviewer.authenticate_with_uid(
        &sa_token,
        "system:serviceaccount:agents:agent",
        "5d3c9a1e-0000-4000-8000-00000000a9e7",
        &["system:serviceaccounts"],
    );
    reviewer.authenticate("opaque-static-token", "admin-user", &["system:masters"]);
    reviewer.fail("flaky", "connection refused");
    let verifier = verifier_for(&issuer, Some(reviewer.clone())).await;

    let w = workload("agents", "agent");
    let p = verifier.verify(Some(&bearer(&sa_token)), &w).await;
    assert_eq!(p.kind, PrincipalKind::ServiceAccount, "{p:?}");
    assert_eq!(
        p.subject.as_deref(),
        Some("system:serviceaccount:agents:agent")
    );
    assert_eq!(p.groups, ["system:serviceaccounts"]);
    assert_eq!(
        p.uid.as_deref(),
        Some("5d3c9a1e-0000-4000-8000-00000000a9e7"),
        "the UID TokenReview returned feeds Impersonate-Uid"
    );
    assert_eq!(p.mismatch, None);
    assert_eq!(reviewer.calls(), 1);
    // Cached: the same token again does not ask the API server.
    let again = verifier.verify(Some(&bearer(&sa_token)), &w).await;
    assert_eq!(again, p);
    assert_eq!(
        reviewer.calls(),
        1,
        "second verify must come from the cache"
    );

    // The same token presented by another pod: flagged, and the cache still serves it.
    let elsewhere = verifier
        .verify(Some(&bearer(&sa_token)), &workload("agents", "builder"))
        .await;
    assert_eq!(elsewhere.kind, PrincipalKind::ServiceAccount);
    let mismatch = elsewhere
        .mismatch
        .clone()
        .unwrap_or_else(|| panic!("mismatch not flagged"));
    assert!(
        mismatch.contains("agents/agent") && mismatch.contains("agents/builder"),
        "{mismatch}"
    );
    assert_eq!(
        elsewhere.record().mismatch.as_deref(),
        Some(mismatch.as_str()),
        "the recorded principal carries the mismatch too"
    );
    assert_eq!(reviewer.calls(), 1);
    // The cached principal is shared, not changed by the flag on one request.
    let back = verifier.verify(Some(&bearer(&sa_token)), &w).await;
    assert_eq!(
        (back.mismatch.as_deref(), back.record().mismatch.as_deref()),
        (None, None)
    );

    let p = verifier
        .verify(Some(&bearer("opaque-static-token")), &w)
        .await;
    assert_eq!(
        (p.kind, p.subject.as_deref()),
        (PrincipalKind::User, Some("admin-user"))
    );
    assert_eq!(p.mismatch, None, "non-SA users are not compared");

    // Unauthenticated: invalid with the API server's reason, cached.
    let calls = reviewer.calls();
    for _ in 0..2 {
        let p = verifier.verify(Some(&bearer("unknown-token")), &w).await;
        expect_invalid(&p, "invalid bearer token", "unauthenticated");
    }
    assert_eq!(
        reviewer.calls(),
        calls + 1,
        "an invalid verdict is cached too"
    );

    // API server unreachable: invalid, not cached.
    for _ in 0..2 {
        let p = verifier.verify(Some(&bearer("flaky")), &w).await;
        expect_invalid(&p, "connection refused", "review failed");
    }
    assert_eq!(
        reviewer.calls(),
        calls + 3,
        "a failed review must not be cached"
    );

    // The cache holds hashes, never the tokens.
    assert_eq!(verifier.cached_entries(), 3);
    let debug = format!("{verifier:?}");
    assert!(!debug.contains("opaque-static-token"), "{debug}");
}

#[tokio::test]
async fn authorization_header_forms() {
    let key = TestKey::rs256("k", 0);
    let issuer = TestIssuer::start(&[&key]).await;
    let verifier = verifier_for(&issuer, None).await;
    let w = workload("a", "b");
    assert_eq!(*verifier.verify(None, &w).await, Principal::anonymous());
    let token = key.sign(&issuer.claims("alice", CLIENT));
    let lower =
        HeaderValue::from_str(&format!("bearer  {token} ")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        verifier.verify(Some(&lower), &w).await.kind,
        PrincipalKind::Oidc
    );
    let cases = [
        (
            HeaderValue::from_static("Basic YWxpY2U6c2VjcmV0"),
            "unsupported Authorization scheme 'Basic'",
        ),
        (HeaderValue::from_static("Bearer "), "empty bearer token"),
        (HeaderValue::from_static("Bearer"), "empty bearer token"),
        (
            HeaderValue::from_bytes(b"Bearer \xff").unwrap_or_else(|e| panic!("{e}")),
            "not printable",
        ),
    ];
    for (header, want) in cases {
        expect_invalid(&*verifier.verify(Some(&header), &w).await, want, want);
    }
}

#[test]
fn mismatch_rules() {
    let sa = |subject: &str| Principal {
        kind: PrincipalKind::ServiceAccount,
        subject: Some(subject.to_owned()),
        groups: Vec::new(),
        uid: None,
        reason: None,
        mismatch: None,
    };
    let cases = [
        (
            sa("system:serviceaccount:agents:agent"),
            workload("agents", "agent"),
            false,
        ),
        (
            sa("system:serviceaccount:agents:agent"),
            workload("agents", "other"),
            true,
        ),
        (
            sa("system:serviceaccount:agents:agent"),
            workload("other", "agent"),
            true,
        ),
        (
            sa("system:serviceaccount:agents:agent"),
            WorkloadIdentity::default(),
            false,
        ),
        (
            sa("system:serviceaccount:bad"),
            workload("agents", "agent"),
            false,
        ),
        (
            Principal {
                kind: PrincipalKind::Oidc,
                ..sa("system:serviceaccount:x:y")
            },
            workload("agents", "agent"),
            false,
        ),
    ];
    for (principal, w, flagged) in cases {
        assert_eq!(
            service_account_mismatch(&principal, &w).is_some(),
            flagged,
            "{principal:?} vs {w:?}"
        );
    }
}

/// A connection that presents the same token again is answered from its memo, which
/// never outlives the token cache's entry: once the cache's time is up the token is
/// reviewed again, a cache turned off means no memo, and another token on the same
/// connection is verified on its own.
#[tokio::test]
async fn a_connection_remembers_its_token_no_longer_than_the_cache_would() {
    let key = TestKey::rs256("k", 0);
    let issuer = TestIssuer::start(&[&key]).await;
    let reviewer = Arc::new(FakeTokenReviewer::new());
    reviewer.authenticate(
        "token-a",
        "system:serviceaccount:agents:agent",
        &["system:serviceaccounts"],
    );
    reviewer.authenticate("token-b", "admin-user", &["system:masters"]);
    let verifier_with_ttl = |ttl| {
        let oidc = OidcVerifier::new(issuer.config(CLIENT)).unwrap_or_else(|e| panic!("{e}"));
        PrincipalVerifier::new(
            vec![oidc],
            Some(reviewer.clone() as Arc<dyn TokenReviewer>),
            ttl,
        )
    };
    let verifier = verifier_with_ttl(Duration::from_millis(300));
    let memo = TokenMemo::default();
    let w = workload("agents", "agent");

    let first = verifier
        .verify_on_connection(Some(&bearer("token-a")), &w, &memo)
        .await;
    assert_eq!(
        first.subject.as_deref(),
        Some("system:serviceaccount:agents:agent")
    );
    let again = verifier
        .verify_on_connection(Some(&bearer("token-a")), &w, &memo)
        .await;
    assert_eq!(again, first);
    assert_eq!(reviewer.calls(), 1);

    // Another token on the connection, then the first one back.
    let other = verifier
        .verify_on_connection(Some(&bearer("token-b")), &w, &memo)
        .await;
    assert_eq!(
        (other.kind, other.subject.as_deref()),
        (PrincipalKind::User, Some("admin-user"))
    );
    let back = verifier
        .verify_on_connection(Some(&bearer("token-a")), &w, &memo)
        .await;
    assert_eq!(back, first);
    assert_eq!(reviewer.calls(), 2, "token-a still came from the cache");

    // The same token from a pod running as another service account is flagged.
    let elsewhere = verifier
        .verify_on_connection(
            Some(&bearer("token-a")),
            &workload("agents", "builder"),
            &TokenMemo::default(),
        )
        .await;
    assert!(elsewhere.mismatch.is_some(), "{elsewhere:?}");

    // Past the cache's time the token is reviewed again, memo or not.
    tokio::time::sleep(Duration::from_millis(400)).await;
    verifier
        .verify_on_connection(Some(&bearer("token-a")), &w, &memo)
        .await;
    assert_eq!(
        reviewer.calls(),
        3,
        "an expired verdict was served from the memo"
    );

    // No cache, no memo: every request is reviewed.
    let uncached = verifier_with_ttl(Duration::ZERO);
    let memo = TokenMemo::default();
    for _ in 0..2 {
        uncached
            .verify_on_connection(Some(&bearer("token-b")), &w, &memo)
            .await;
    }
    assert_eq!(reviewer.calls(), 5);
    assert_eq!(
        *uncached.verify_on_connection(None, &w, &memo).await,
        Principal::anonymous()
    );
}
