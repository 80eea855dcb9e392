//! Every built-in detector: what it finds, and the controls that keep it quiet on ordinary
//! text. Credentials are assembled from pieces so this file does not itself trip secret
//! scanners.

use base64::Engine as _;

use super::*;

/// Test credentials (random, never valid anywhere).
pub(crate) mod fixtures {
    use super::*;

    pub fn github_token() -> String {
        ["gh", "p_u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8d"].concat()
    }
    pub fn github_pat() -> String {
        [
            "github",
            "_pat_KLzdocJ2isAjIhKtJ0RlgL_KOmxgJTeKdNnFRIBXuDL7DxtpYlSXpfKtHF4vUCsMehGAkWvj7FAc9QeWJK",
        ]
        .concat()
    }
    pub fn aws_key_id() -> String {
        ["AK", "IAUVW75EFR6EDT4SYW"].concat()
    }
    pub fn aws_secret() -> String {
        ["c7Tvo+hBKqFYY+kv5ZJr", "3J1TWDtkwtDDb/xHKas1"].concat()
    }
    pub fn slack_bot() -> String {
        [
            "xo",
            "xb-123456789012-1234567890123-IxNKu8iS2G8NPRVdD53X83RZ",
        ]
        .concat()
    }
    pub fn slack_webhook() -> String {
        [
            "https://hooks.",
            "slack.com/services/T09ZZZZG4/B0ZDMEN2K/hvMdgaKjIg8xNbe3nNyjOq9w",
        ]
        .concat()
    }
    pub fn jwt() -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.{}",
            b64(r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#),
            b64(
                r#"{"iss":"https://kubernetes.default.svc","sub":"system:serviceaccount:agents:cursor"}"#
            ),
            "c2lnbmF0dXJlLW5vdC1yZWFsbHktYS1zaWduYXR1cmU"
        )
    }
    /// A PKCS#1 RSA key's shape (random base64 lines), ending with a newline.
    pub fn pem_key() -> String {
        [
            "-----BEGIN RSA ",
            "PRIVATE KEY-----\n",
            "ml15Hx3ZfP76d3p7TxUkGr9XvUN61LEphAU08/OHXCWwi+oGwodM+qTdF7LYQoRd\n",
            "6CpbxTmIiseAVKI5nM/J/MLaMc490Wa9zTozhH5buwf9B8pHeEIxsZr0WHLO77n8\n",
            "WfT5XRQ4Gjp4MlY0e5/85pzXAHrop1jMpBXVqR7oY8i2wDN64y1vyqJVFs3y+Lhl\n",
            "-----END RSA PRIVATE KEY-----\n",
        ]
        .concat()
    }
}

use fixtures::*;

fn builtin() -> Detectors {
    Detectors::compile(&DetectorsSpec::default()).expect("built-in detectors compile")
}

fn redact(d: &Detectors, text: &str) -> (String, Vec<Hits>) {
    let mut hits = Vec::new();
    let out = d.redact(text, &mut hits).into_owned();
    (out, hits)
}

#[test]
fn every_builtin_detector_finds_its_credentials() {
    let d = builtin();
    let cases: Vec<(String, String, &str)> = vec![
        (
            format!("using key {} for s3", aws_key_id()),
            "using key **masked:aws-access-key** for s3".into(),
            "aws-access-key",
        ),
        (
            format!("aws_secret_access_key = {}\n", aws_secret()),
            "aws_secret_access_key = **masked:aws-secret-key**\n".into(),
            "aws-secret-key",
        ),
        (
            format!("key:\n{}done\n", pem_key()),
            "key:\n**masked:pem-private-key**\ndone\n".into(),
            "pem-private-key",
        ),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----"
                .into(),
            "**masked:pem-private-key**".into(),
            "pem-private-key",
        ),
        (
            // Cut off before its END line (a truncated value): masked to the end.
            "x -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIIz".into(),
            "x **masked:pem-private-key**".into(),
            "pem-private-key",
        ),
        (
            format!("Authorization: Bearer {}", jwt()),
            "Authorization: Bearer **masked:jwt**".into(),
            "jwt",
        ),
        (
            format!("GITHUB_TOKEN={}", github_token()),
            // The key=value detector finds the same value; overlaps merge into one marker.
            "GITHUB_TOKEN=**masked:github-token**".into(),
            "github-token",
        ),
        (
            format!("cloning with {}@github.com", github_pat()),
            "cloning with **masked:github-token**@github.com".into(),
            "github-token",
        ),
        (
            format!("slack bot {} ready", slack_bot()),
            "slack bot **masked:slack-token** ready".into(),
            "slack-token",
        ),
        (
            format!("posting to {}", slack_webhook()),
            "posting to **masked:slack-webhook**".into(),
            "slack-webhook",
        ),
        (
            "db password=hunter2!x retrying".into(),
            "db password=**masked:password-assignment** retrying".into(),
            "password-assignment",
        ),
        (
            r#"{"user":"app","password": "correct horse battery"}"#.into(),
            r#"{"user":"app","password": "**masked:password-assignment**"}"#.into(),
            "password-assignment",
        ),
        (
            r#"msg="{\"DB_PASSWORD\":\"s3cr3t-Pa55\"}""#.into(),
            r#"msg="{\"DB_PASSWORD\":\"**masked:password-assignment**\"}""#.into(),
            "password-assignment",
        ),
        (
            "client_secret: 9f8Ae72kQpLz0XcV3bN1\n".into(),
            "client_secret: **masked:secret-assignment**\n".into(),
            "secret-assignment",
        ),
        (
            "connecting to postgres://app:Tr0ub4dor3@db.internal:5432/orders".into(),
            "connecting to postgres://app:**masked:connection-string**@db.internal:5432/orders"
                .into(),
            "connection-string",
        ),
    ];
    for (input, want, id) in cases {
        let (got, hits) = redact(&d, &input);
        assert_eq!(got, want, "{id}: {input:?}");
        assert!(
            hits.iter().any(|h| h.detector == id && h.count >= 1),
            "{id}: hits {hits:?} for {input:?}"
        );
    }
}

#[test]
fn ordinary_text_is_left_alone() {
    let d = builtin();
    let quiet = [
        "2026-12-01T10:00:00.123Z INFO  http GET /api/v1/users/1234 200 3.2ms",
        "level=info msg=\"reconciled\" controller=deployment name=web namespace=default",
        // a sha256 and a UUID
        "image digest sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        "request_id=3f2504e0-4f89-41d3-9a0c-0305e82c3301 done",
        // keywords without credentials
        "token expired, refreshing",
        "password is required",
        "the secret named db-creds was updated",
        "Password: ",
        "tokens: 5",
        "token_type: Bearer",
        "AKIA is the prefix of an AWS access key id",
        // placeholders
        "password=${DB_PASSWORD}",
        "password: <password>",
        "password=******",
        "password=null",
        "secret: {{ .Values.secret }}",
        "api_key=$API_KEY",
        // documented examples
        "aws_access_key_id=AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        // a URL without credentials, one with a user only, and an e-mail
        "fetching https://example.com/path?x=1 and git@github.com:org/repo.git",
        "ssh://git@host/repo mailto:ops@example.com",
        // low-entropy "tokens"
        "GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "token=aaaaaaaaaaaaaaaa",
        // an already masked value
        "password=**masked:password-assignment**",
        // base64 that is not a JWT header
        "eyJub3QiOiJhIGp3dCJ9.eyJhIjoxfQ.c2ln",
        // a public key / certificate block
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    ];
    for line in quiet {
        let (got, hits) = redact(&d, line);
        assert_eq!(got, line, "false positive, hits {hits:?}");
        assert!(hits.is_empty(), "{line}: {hits:?}");
    }
}

/// Values are masked whole however long they are (the patterns once stopped at 256
/// characters, and a longer password was shown); a `containerd://` id, in every Pod's
/// status, holds no `@` and is left alone.
#[test]
fn long_values_are_masked_whole_and_container_ids_left_alone() {
    let d = builtin();
    let long = "x7Q".repeat(120);
    // 300 characters, every letter and digit alike often: random enough for any detector.
    let random: String = (0..300u32)
        .map(|i| {
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                    [(i * 37 % 62) as usize],
            )
        })
        .collect();
    for (input, want) in [
        (
            format!("postgres://api:{long}@db:5432/app"),
            "postgres://api:**masked:connection-string**@db:5432/app".to_owned(),
        ),
        (
            format!("password=\"{long}\""),
            "password=\"**masked:password-assignment**\"".to_owned(),
        ),
        (
            format!("db_password: {long}"),
            "db_password: **masked:password-assignment**".to_owned(),
        ),
        // Only a value's first 256 bytes decide whether it is an example or a
        // placeholder: text further on does not let it through.
        (
            format!("api_key={random}EXAMPLE"),
            "api_key=**masked:secret-assignment**".to_owned(),
        ),
        (
            format!("password=<{long}>"),
            "password=**masked:password-assignment**".to_owned(),
        ),
        // ...nor what comes after a plain start.
        (
            format!("api_key={}{random}", "a".repeat(256)),
            "api_key=**masked:secret-assignment**".to_owned(),
        ),
        (
            format!("password={}{random}", "$".repeat(300)),
            "password=**masked:password-assignment**".to_owned(),
        ),
    ] {
        assert_eq!(redact(&d, &input).0, want, "{input}");
    }
    let id = "containerd://9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b";
    assert_eq!(redact(&d, id), (id.to_owned(), Vec::new()));
}

#[test]
fn weak_real_passwords_are_still_masked() {
    // Low entropy is no reason to show a password: an agent could log in with it.
    let d = builtin();
    for (input, want) in [
        (
            "password=password",
            "password=**masked:password-assignment**",
        ),
        (
            "password: changeme",
            "password: **masked:password-assignment**",
        ),
        (
            "mysql://root:admin@db:3306",
            "mysql://root:**masked:connection-string**@db:3306",
        ),
    ] {
        assert_eq!(redact(&d, input).0, want);
    }
}

#[test]
fn unchanged_text_is_borrowed_and_counts_are_per_detector() {
    let d = builtin();
    let mut hits = Vec::new();
    assert!(matches!(
        d.redact("nothing to see here", &mut hits),
        Cow::Borrowed(_)
    ));
    let text = format!("{} and {} and {}", github_token(), github_token(), jwt());
    let (out, hits) = redact(&d, &text);
    assert_eq!(
        out,
        "**masked:github-token** and **masked:github-token** and **masked:jwt**"
    );
    assert_eq!(
        hits,
        vec![
            Hits {
                detector: "github-token",
                count: 2
            },
            Hits {
                detector: "jwt",
                count: 1
            }
        ]
    );
}

#[test]
fn bytes_outside_secrets_are_copied_exactly() {
    let d = builtin();
    let mut input = vec![0u8, 0xff, 0xfe, b'\n', 0x80];
    input.extend_from_slice(format!(" {} ", github_token()).as_bytes());
    input.extend_from_slice(&[0xc3, 0x28, 0x00, 0xff]);
    let mut hits = Vec::new();
    let out = d.redact_bytes(&input, &mut hits);
    let mut want = vec![0u8, 0xff, 0xfe, b'\n', 0x80];
    want.extend_from_slice(b" **masked:github-token** ");
    want.extend_from_slice(&[0xc3, 0x28, 0x00, 0xff]);
    assert_eq!(&*out, &want[..]);
    // A PEM block inside binary data is still found (any byte may sit between its lines).
    let mut input = b"\x00\xffhead ".to_vec();
    input.extend_from_slice(pem_key().replace('\n', "\n\u{0}").as_bytes());
    let out = d.redact_bytes(&input, &mut hits).into_owned();
    assert!(out.starts_with(b"\x00\xffhead **masked:pem-private-key**"));
    // Non-ASCII text around a secret stays valid UTF-8.
    let (out, _) = redact(&d, &format!("ключ «{}» ✓", github_token()));
    assert_eq!(out, "ключ «**masked:github-token**» ✓");
}

#[test]
fn disable_and_extra_detectors() {
    let spec: DetectorsSpec = serde_norway::from_str(
        "disable: [jwt]\nextra:\n- id: acme-key\n  regex: 'acme_[a-z0-9]{16}'\n  keywords: [acme_]\n  minEntropy: 3\n",
    )
    .expect("spec parses");
    let d = Detectors::compile(&spec).expect("compiles");
    assert!(!d.ids().any(|id| id == "jwt"));
    let text = format!("{} acme_k3j4h5g6f7d8s9a0 acme_aaaaaaaaaaaaaaaa", jwt());
    let (out, hits) = redact(&d, &text);
    assert_eq!(
        out,
        format!("{} **masked:acme-key** acme_aaaaaaaaaaaaaaaa", jwt())
    );
    assert_eq!(
        hits,
        vec![Hits {
            detector: "acme-key",
            count: 1
        }]
    );
    // A capture group narrows what is masked.
    let spec = DetectorsSpec {
        disable: vec![],
        extra: vec![ExtraDetector {
            id: "pin".into(),
            regex: r"PIN (\d{4,8})".into(),
            keywords: vec![],
            min_entropy: None,
        }],
    };
    let (out, _) = redact(&Detectors::compile(&spec).unwrap(), "your PIN 482913.");
    assert_eq!(out, "your PIN **masked:pin**.");
}

#[test]
fn bad_specs_are_rejected_with_the_field_at_fault() {
    let extra = |id: &str, regex: &str, min_entropy: Option<f64>| DetectorsSpec {
        disable: vec![],
        extra: vec![ExtraDetector {
            id: id.into(),
            regex: regex.into(),
            keywords: vec!["k".into()],
            min_entropy,
        }],
    };
    let cases = [
        (
            DetectorsSpec {
                disable: vec!["jwtt".into()],
                extra: vec![],
            },
            "detectors.disable: unknown detector \"jwtt\"",
        ),
        (
            extra("x", "(unclosed", None),
            "detectors.extra[0].regex (detector \"x\"): regex parse error",
        ),
        (
            extra("Bad Id", "x", None),
            "detectors.extra[0].id: \"Bad Id\" is not a detector id",
        ),
        (
            extra("jwt", "x", None),
            "detectors.extra[0].id: \"jwt\" is a built-in detector",
        ),
        (extra("x", "a*", None), "matches the empty string"),
        (
            extra("x", "a", Some(9.0)),
            "detectors.extra[0].minEntropy: 9 is outside 0 to 8",
        ),
        (
            extra("x", "a", Some(f64::NAN)),
            "minEntropy: NaN is outside",
        ),
        (
            extra("x", "a{1000}{1000}", None),
            "detectors.extra[0].regex",
        ),
    ];
    for (spec, want) in cases {
        let err = Detectors::compile(&spec).expect_err(want);
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
    let twice = DetectorsSpec {
        disable: vec![],
        extra: vec![
            ExtraDetector {
                id: "a".into(),
                regex: "a".into(),
                keywords: vec![],
                min_entropy: None,
            };
            2
        ],
    };
    assert!(
        Detectors::compile(&twice)
            .unwrap_err()
            .contains("used twice")
    );
    let unknown: Result<DetectorsSpec, _> = serde_norway::from_str("disabled: [jwt]");
    assert!(unknown.is_err(), "unknown keys are rejected");
}

#[test]
fn entropy_is_bits_per_byte() {
    assert_eq!(shannon_entropy(b""), 0.0);
    assert_eq!(shannon_entropy(b"aaaa"), 0.0);
    assert!((shannon_entropy(b"abcd") - 2.0).abs() < 1e-9);
    assert!((shannon_entropy(&(0..=255u8).collect::<Vec<_>>()) - 8.0).abs() < 1e-9);
}
