//! Responses masked on their way to the agent, for requests the policy decided `mask`.
//!
//! Only requests whose decision carries a [`Masker`] come here; every other response
//! streams through untouched. Upstream is asked for JSON ([`json_only_accept`]); a JSON
//! body is read whole (bounded, gzip decompressed), masked and sent uncompressed with a
//! new length; a watch is masked event by event as it streams ([`MaskedWatch`]). A
//! response that must be masked and cannot be (protobuf, YAML, CBOR, an unknown
//! content encoding, malformed JSON, over the bounds) is refused with a `Status`, and a
//! watch that goes bad mid-stream ends with an ERROR event: never passed on unmasked.

use std::{
    io::Read as _,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header, response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};

use crate::{
    admin::Metrics,
    masking::objects::{MaskError, MaskReport, Masker, Target, WatchMasker, watch_error_event},
    status::Status,
};

use super::{BoxError, ProxyBody};

/// The `Accept` sent upstream when a response must be masked: the client's JSON choices
/// (protobuf entries become JSON with the same parameters, so `as=Table` stays unless
/// `tables` is false), never an encoding the gateway does not mask; `application/json`
/// when nothing is left. Without a Table, kubectl prints the object's name and age.
pub(super) fn json_only_accept(accept: Option<&HeaderValue>, tables: bool) -> HeaderValue {
    let text = accept.and_then(|v| v.to_str().ok()).unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for entry in text.split(',') {
        let entry = entry.trim();
        let (media, params) = entry.split_once(';').unwrap_or((entry, ""));
        let media = media.trim();
        let json = media.eq_ignore_ascii_case("application/json")
            || media.eq_ignore_ascii_case(crate::protobuf::MEDIA_TYPE);
        if !json {
            continue;
        }
        let table = params.split(';').any(|p| {
            p.trim()
                .split_once('=')
                .is_some_and(|(k, v)| k.trim() == "as" && v.trim() == "Table")
        });
        if table && !tables {
            continue;
        }
        let rewritten = if params.is_empty() {
            "application/json".to_owned()
        } else {
            format!("application/json;{params}")
        };
        if !out.contains(&rewritten) {
            out.push(rewritten);
        }
    }
    if out.is_empty() {
        return HeaderValue::from_static("application/json");
    }
    HeaderValue::from_str(&out.join(",")).unwrap_or(HeaderValue::from_static("application/json"))
}

/// How a response's body is encoded, as far as masking is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    /// JSON: masked.
    Json,
    /// An object encoding the gateway does not mask (protobuf, YAML, CBOR): refused.
    Unmaskable,
    /// Not an object (logs, proxied content, no body): passed as it is.
    Other,
}

/// Why a masked response that is not a pod log cannot be passed on, if it cannot: only
/// JSON is read and masked here (pod logs line by line elsewhere). Other content with a
/// body (text, HTML, binary, from a proxy subresource, an aggregated API or an error page)
/// would pass unread, so it is refused.
pub(super) fn unmaskable_other(status: StatusCode, headers: &HeaderMap) -> Option<String> {
    let empty = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    if empty || body_kind(headers) == BodyKind::Json {
        return None;
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .map_or("no Content-Type".into(), |v| {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        });
    Some(format!(
        "the policy masks this answer, and it ({ct}) is not JSON: the gateway masks JSON objects (and pod logs, line by line), and passes nothing else unread"
    ))
}

fn body_kind(headers: &HeaderMap) -> BodyKind {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return BodyKind::Other;
    };
    let media = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" => BodyKind::Json,
        m if m == crate::protobuf::MEDIA_TYPE
            || m.contains("yaml")
            || m.contains("cbor")
            || m.ends_with("+json") =>
        {
            BodyKind::Unmaskable
        }
        _ => BodyKind::Other,
    }
}

/// A masked response body and what was masked (`None` for a watch, whose report fills as
/// it streams).
pub(super) struct Masked {
    pub(super) body: ProxyBody,
    pub(super) report: MaskReport,
    /// The report a watch fills event by event.
    pub(super) live: Option<Arc<Mutex<MaskReport>>>,
}

/// Why a response was refused instead of being passed unmasked.
pub(super) fn refusal(why: &dyn std::fmt::Display) -> Status {
    Status::failure(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        format!(
            "chaperone: this response must be masked and could not be, so it is refused: {why}"
        ),
    )
}

/// Masks an upstream response for the agent; `Err` is the `Status` to send instead.
pub(super) async fn mask_response(
    parts: &mut response::Parts,
    body: ProxyBody,
    masker: Arc<Masker>,
    target: Target<'_>,
    watch: bool,
    dry_run_write: bool,
    metrics: Arc<Metrics>,
) -> Result<Masked, String> {
    let kind = body_kind(&parts.headers);
    let encoding = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty() && v != "identity");
    match kind {
        BodyKind::Other => {
            return Ok(Masked {
                body,
                report: MaskReport::default(),
                live: None,
            });
        }
        BodyKind::Unmaskable => {
            let ct = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            return Err(format!(
                "the API server answered in {ct}, which the gateway does not mask (it asked for JSON)"
            ));
        }
        BodyKind::Json => {}
    }
    let limits = masker.limits();
    if watch {
        if let Some(encoding) = encoding {
            return Err(format!(
                "the watch stream is {encoding}-encoded, which the gateway does not mask"
            ));
        }
        parts.headers.remove(header::CONTENT_LENGTH);
        let live = Arc::new(Mutex::new(MaskReport::default()));
        let body = MaskedWatch {
            inner: body,
            masker: WatchMasker::new(masker, target),
            report: live.clone(),
            metrics,
            done: false,
        };
        return Ok(Masked {
            body: body.boxed(),
            report: MaskReport::default(),
            live: Some(live),
        });
    }
    let limit = limits.max_response_bytes;
    let raw = collect(body, limit).await?;
    let plain = match encoding.as_deref() {
        None => raw,
        Some("gzip" | "x-gzip") => gunzip(&raw, limit)?,
        Some(other) => {
            return Err(format!(
                "the response is {other}-encoded, which the gateway does not decode"
            ));
        }
    };
    let mut report = MaskReport::default();
    let masked = if plain.is_empty() {
        Vec::new()
    } else {
        let masked = masker
            .mask_body(target, &plain, &mut report)
            .map_err(|e| e.to_string())?;
        if dry_run_write {
            crate::masking::objects::without_generation(&masked).unwrap_or(masked)
        } else {
            masked
        }
    };
    // Sent uncompressed: the agent is on this node, so compression would cost CPU and
    // latency for bandwidth that is not scarce, and the recording keeps the same bytes.
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(masked.len()));
    let body = Full::new(Bytes::from(masked))
        .map_err(|never| match never {})
        .boxed();
    Ok(Masked {
        body,
        report,
        live: None,
    })
}

/// Reads a body whole, refusing one over `limit` bytes.
async fn collect(mut body: ProxyBody, limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the response: {e}"))?;
        if let Some(data) = frame.data_ref() {
            if (out.len() + data.len()) as u64 > limit {
                return Err(MaskError::TooLarge {
                    what: "response",
                    limit,
                }
                .to_string());
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out)
}

/// Decompresses a gzip body, refusing one that inflates beyond `limit` bytes.
pub(super) fn gunzip(raw: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| format!("the gzip response could not be decompressed: {e}"))?;
    if out.len() as u64 > limit {
        return Err(format!(
            "the response decompresses to more than the {limit} bytes the gateway masks"
        ));
    }
    Ok(out)
}

/// A watch stream masked event by event; a stream that cannot be masked ends with an
/// ERROR event (the API server's way to end a watch it cannot continue).
pub(super) struct MaskedWatch {
    inner: ProxyBody,
    masker: WatchMasker,
    report: Arc<Mutex<MaskReport>>,
    metrics: Arc<Metrics>,
    done: bool,
}

impl MaskedWatch {
    fn fail(&mut self, e: &MaskError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.metrics.masking_failures.inc();
        tracing::warn!(error = %e, "watch event could not be masked; the watch is ended");
        let message =
            format!("chaperone: a watch event could not be masked, so the watch is ended: {e}");
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(watch_error_event(
            &message,
        ))))))
    }
}

impl Body for MaskedWatch {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let Some(data) = frame.data_ref() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let mut out = Vec::new();
                    let pushed = match this.report.lock() {
                        Ok(mut report) => this.masker.push(data, &mut out, &mut report),
                        Err(poisoned) => {
                            this.masker.push(data, &mut out, &mut poisoned.into_inner())
                        }
                    };
                    if let Err(e) = pushed {
                        return this.fail(&e);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let mut out = Vec::new();
                    let finished = match this.report.lock() {
                        Ok(mut report) => this.masker.finish(&mut out, &mut report),
                        Err(poisoned) => this.masker.finish(&mut out, &mut poisoned.into_inner()),
                    };
                    if let Err(e) = finished {
                        return this.fail(&e);
                    }
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {

    /// A masked proxy passes JSON (masked like any object) and empty answers; text, HTML,
    /// binary and untyped content would pass unread, so it is refused.
    #[test]
    fn masked_proxied_answers_pass_only_as_json_or_empty() {
        let with = |pairs: &[(header::HeaderName, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(k.clone(), HeaderValue::from_static(v));
            }
            h
        };
        let json = with(&[(header::CONTENT_TYPE, "application/json; charset=utf-8")]);
        assert_eq!(unmaskable_other(StatusCode::OK, &json), None);
        assert_eq!(
            unmaskable_other(StatusCode::NO_CONTENT, &HeaderMap::new()),
            None
        );
        let empty = with(&[
            (header::CONTENT_TYPE, "text/plain"),
            (header::CONTENT_LENGTH, "0"),
        ]);
        assert_eq!(unmaskable_other(StatusCode::OK, &empty), None);
        for (headers, named) in [
            (with(&[(header::CONTENT_TYPE, "text/plain")]), "text/plain"),
            (with(&[(header::CONTENT_TYPE, "text/html")]), "text/html"),
            (
                with(&[(header::CONTENT_TYPE, "application/octet-stream")]),
                "application/octet-stream",
            ),
            (HeaderMap::new(), "no Content-Type"),
        ] {
            let why = unmaskable_other(StatusCode::OK, &headers).expect("refused");
            assert!(why.contains(named), "{why}");
        }
    }
    use super::*;

    #[test]
    fn accept_keeps_json_choices_only() {
        for (accept, want) in [
            (
                Some("application/vnd.kubernetes.protobuf, */*"),
                "application/json",
            ),
            (
                Some(
                    "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
                ),
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
            ),
            (
                Some(
                    "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json",
                ),
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
            ),
            (Some("application/yaml"), "application/json"),
            (
                Some("application/cbor, application/json"),
                "application/json",
            ),
            (None, "application/json"),
        ] {
            let header = accept.map(HeaderValue::from_static);
            assert_eq!(json_only_accept(header.as_ref(), true), want, "{accept:?}");
        }
        // Without Tables (configured paths apply): kubectl's Table choices are dropped.
        for (accept, want) in [
            (
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
                "application/json",
            ),
            (
                "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io",
                "application/json",
            ),
            (
                "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io",
                "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io",
            ),
        ] {
            let header = HeaderValue::from_static(accept);
            assert_eq!(json_only_accept(Some(&header), false), want, "{accept}");
        }
    }

    #[test]
    fn content_types_that_cannot_be_masked_are_named() {
        for (ct, want) in [
            (Some("application/json"), BodyKind::Json),
            (Some("application/json;charset=utf-8"), BodyKind::Json),
            (
                Some("application/vnd.kubernetes.protobuf"),
                BodyKind::Unmaskable,
            ),
            (
                Some("application/vnd.kubernetes.protobuf;stream=watch"),
                BodyKind::Unmaskable,
            ),
            (Some("application/yaml"), BodyKind::Unmaskable),
            (Some("application/cbor"), BodyKind::Unmaskable),
            (Some("text/plain"), BodyKind::Other),
            (None, BodyKind::Other),
        ] {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            }
            assert_eq!(body_kind(&h), want, "{ct:?}");
        }
    }

    #[test]
    fn gzip_is_bounded_by_its_decompressed_size() {
        use std::io::Write as _;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&vec![b'a'; 1 << 20]).unwrap();
        let gz = enc.finish().unwrap();
        assert!(gz.len() < 10_000, "a highly compressible body");
        assert_eq!(gunzip(&gz, 1 << 20).unwrap().len(), 1 << 20);
        let err = gunzip(&gz, (1 << 20) - 1).unwrap_err();
        assert!(err.contains("decompresses to more than"), "{err}");
        assert!(gunzip(b"not gzip", 1 << 20).is_err());
    }
}
