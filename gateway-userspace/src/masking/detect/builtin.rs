//! The built-in detector set: patterns, keywords, entropy thresholds and the allowlist of
//! values that are not credentials. docs/policy-reference.md ("Detectors") describes
//! each; keep the two in step.

use base64::Engine as _;
use regex::bytes::Regex;

use super::{Check, DetectorDef, Pem, marker};

/// The id of the PEM detector (the line masker follows its blocks across lines).
pub(crate) const PEM_ID: &str = "pem-private-key";

/// Every built-in detector id, in the order they run.
pub const BUILTIN_IDS: &[&str] = &[
    "aws-access-key",
    "aws-secret-key",
    PEM_ID,
    "jwt",
    "github-token",
    "slack-token",
    "slack-webhook",
    "password-assignment",
    "secret-assignment",
    "connection-string",
];

/// A PEM private key's BEGIN line: `-----BEGIN [RSA |EC |OPENSSH |ENCRYPTED |...]PRIVATE
/// KEY-----`, and PGP's `PRIVATE KEY BLOCK`.
const PEM_BEGIN: &str = r"-----BEGIN[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----";
const PEM_END: &str = r"-----END[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----";

/// The separator between a key and its value: `=`, `:`, `:=`, `=>`, with an optional
/// closing quote (JSON, YAML, also backslash-escaped JSON inside a log line) and blanks,
/// never a line break.
const SEPARATOR: &str = r#"(?:\\?["'])?[ \t]*(?:=>|:=|=|:)[ \t]*"#;
/// The value after a separator: double-quoted (maybe backslash-escaped), single-quoted or
/// bare up to a blank, quote, comma, semicolon or `&`.
///
/// Repetitions are unbounded (`+`, not `{1,256}`): a bounded repetition is compiled into
/// one NFA state per count, and finding a value's span in those states cost 4x as much per
/// hit (docs/benchmarks.md, session 18); a longer value is masked whole.
const VALUE: &str = r#"(?:\\?"([^"\\\r\n]+)|'([^'\r\n]+)'|([^\s"'`,;&\\]+))"#;

pub(crate) fn definitions() -> Vec<DetectorDef<'static>> {
    let kw = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
    let def = |id: &'static str,
               regex: &'static str,
               keywords: Vec<String>,
               min_entropy: f64,
               min_len: usize,
               check: Check| DetectorDef {
        id,
        regex,
        keywords,
        min_entropy,
        min_len,
        check,
        builtin: true,
        needs: None,
    };
    // Leaked once per process: the patterns are built from the shared fragments above.
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    static PATTERNS: std::sync::OnceLock<[&'static str; 4]> = std::sync::OnceLock::new();
    let [pem, password, secret, aws_secret] = *PATTERNS.get_or_init(|| {
        [
            leak(format!(r"{PEM_BEGIN}(?s-u:.)*?(?:{PEM_END}|\z)")),
            leak(format!(
                r"(?i)(?:password|passwd|passphrase)s?{SEPARATOR}{VALUE}"
            )),
            leak(format!(
                r"(?i)(?:secret|token|api[_-]?key|access[_-]?key|auth[_-]?key|private[_-]?key|credentials?)s?{SEPARATOR}{VALUE}"
            )),
            leak(format!(
                r"(?i)(?:secret[_-]?access[_-]?key|aws[_-]?secret(?:[_-]?key)?){SEPARATOR}(?:\\?[\x22'])?([A-Za-z0-9/+]{{40}})(?:[^A-Za-z0-9/+=]|$)"
            )),
        ]
    });
    vec![
        def(
            "aws-access-key",
            r"(?-u:\b)(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}(?-u:\b)",
            kw(&["akia", "asia", "abia", "acca", "a3t"]),
            3.0,
            20,
            Check::None,
        ),
        def(
            "aws-secret-key",
            aws_secret,
            kw(&[
                "secret_access_key",
                "secretaccesskey",
                "secret-access-key",
                "aws_secret",
                "aws-secret",
                "awssecret",
            ]),
            4.0,
            40,
            Check::None,
        ),
        def(PEM_ID, pem, kw(&["private key"]), 0.0, 1, Check::None),
        def(
            "jwt",
            r"(?-u:\b)eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
            kw(&["eyj"]),
            0.0,
            1,
            Check::Jwt,
        ),
        def(
            "github-token",
            r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})(?-u:\b)",
            kw(&["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"]),
            3.0,
            40,
            Check::None,
        ),
        def(
            "slack-token",
            r"(?-u:\b)(?:xox[abposre]-[0-9A-Za-z-]{10,250}|xapp-[0-9]+-[0-9A-Za-z-]{10,250})",
            kw(&["xox", "xapp-"]),
            3.0,
            15,
            Check::None,
        ),
        def(
            "slack-webhook",
            r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9+/_-]{20,}",
            kw(&["hooks.slack.com"]),
            0.0,
            1,
            Check::None,
        ),
        def(
            "password-assignment",
            password,
            kw(&["password", "passwd", "passphrase"]),
            0.0,
            3,
            Check::Value,
        ),
        def(
            "secret-assignment",
            secret,
            kw(&[
                "secret",
                "token",
                "apikey",
                "api_key",
                "api-key",
                "access_key",
                "access-key",
                "accesskey",
                "auth_key",
                "auth-key",
                "authkey",
                "private_key",
                "private-key",
                "privatekey",
                "credential",
            ]),
            3.5,
            10,
            Check::Value,
        ),
        DetectorDef {
            // Without an `@` there is no `user:password@`: a container's `containerd://`
            // id, in every Pod's status, is not run through the regex (4x its cost).
            needs: Some(b'@'),
            ..def(
                "connection-string",
                r#"(?-u:\b)[A-Za-z][A-Za-z0-9+.-]{1,30}://[^\s:/?#@"'<>]+:([^\s/?#@"'<>]+)@[^\s/?#@"'<>]"#,
                kw(&["://"]),
                0.0,
                1,
                Check::Value,
            )
        },
    ]
}

pub(crate) fn pem() -> Result<Pem, String> {
    let compile = |p: &str| Regex::new(p).map_err(|e| format!("built-in detector {PEM_ID}: {e}"));
    Ok(Pem {
        begin: compile(PEM_BEGIN)?,
        end: compile(PEM_END)?,
        marker: marker(PEM_ID).into_bytes(),
    })
}

/// A JWT's first part decodes (base64url) to a JSON object with an `alg`.
pub(crate) fn is_jwt(token: &[u8]) -> bool {
    let Some(header) = token.split(|&b| b == b'.').next() else {
        return false;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .and_then(|v| v.get("alg").map(serde_json::Value::is_string))
        .unwrap_or(false)
}

/// Values of `key=value` credentials that are not credentials: empty-ish words, templated
/// references (`${VAR}`, `$VAR`, `$(cmd)`, `{{ .Values.x }}`, `<password>`, `%s`), and one
/// character repeated (`xxxx`, `****`). Weak real passwords (`changeme`, `password`,
/// `admin`) are NOT here: an agent could use them.
pub(crate) fn is_placeholder(value: &[u8]) -> bool {
    const WORDS: &[&str] = &[
        "null",
        "nil",
        "none",
        "true",
        "false",
        "yes",
        "no",
        "empty",
        "undefined",
        "unset",
        "required",
        "optional",
        "redacted",
        "hidden",
        "masked",
        "n/a",
        "notset",
        "not-set",
        "not_set",
    ];
    if WORDS
        .iter()
        .any(|w| value.eq_ignore_ascii_case(w.as_bytes()))
    {
        return true;
    }
    let templated = value.starts_with(b"${")
        || value.starts_with(b"$(")
        || value.starts_with(b"{{")
        || value.starts_with(b"%s")
        || value.starts_with(b"%(")
        || (value.starts_with(b"<") && value.ends_with(b">"))
        || (value.len() > 1
            && value[0] == b'$'
            && value[1..]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_'));
    if templated {
        return true;
    }
    value.iter().all(|b| *b == value[0])
}
