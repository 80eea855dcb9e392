//! Header hygiene: what never passes upstream (the agent's credentials, impersonation,
//! hop-by-hop headers) and what never comes back.

use http::{HeaderMap, HeaderName, header};

/// Headers that describe one hop, not the message (RFC 9110 7.6.1), as header names, so
/// removing them needs no parsing per request.
pub(super) static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::UPGRADE || HOP_BY_HOP.contains(name)
}

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names (compared, not hashed) says
    // so, where removing each of the nine names costs a hash and a probe of the map.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named by Connection are hop-by-hop too (Connection is in `HOP_BY_HOP`).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim).map(str::to_ascii_lowercase))
        .filter_map(|n| HeaderName::try_from(n).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Removes everything the agent must not be able to pass upstream: its own credentials
/// (the gateway injects its own), impersonation (refused earlier; removed again as a second
/// line of defence), its `Audit-ID` (the API server would take it as the audit id of its
/// event; the gateway sends its own), and hop-by-hop headers.
pub(super) fn sanitize_request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    // The rest are rare on a request to the API server: one pass over the names finds
    // them (`Proxy-Authorization` went with the hop-by-hop headers).
    let rare: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            *k == header::HOST
                || *k == header::COOKIE
                || k.as_str() == "audit-id"
                || k.as_str().starts_with("impersonate-")
        })
        .cloned()
        .collect();
    for name in rare {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn end_to_end_headers_pass_untouched() {
        let mut headers = map(&[
            ("content-type", "application/json"),
            ("audit-id", "x"),
            ("x-kubernetes-pf-flowschema-uid", "y"),
        ]);
        let before = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic eA=="),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["content-type"]);
        // One of them alone is found too.
        let mut headers = map(&[("te", "trailers"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["accept"]);
    }

    #[test]
    fn sanitizing_removes_credentials_host_cookies_impersonation_and_audit_ids() {
        let mut headers = map(&[
            ("authorization", "Bearer agent"),
            ("host", "kubernetes.default.svc"),
            ("cookie", "a=b"),
            ("impersonate-user", "admin"),
            ("impersonate-extra-scopes", "x"),
            ("proxy-authorization", "Basic eA=="),
            ("accept", "application/json"),
            ("user-agent", "kubectl/v1.32.0"),
            ("audit-id", "another-requests-id"),
        ]);
        sanitize_request_headers(&mut headers);
        assert_eq!(names(&headers), ["accept", "user-agent"]);
    }
}
