//! Off the node: finished Parquet files and the manifests are copied to S3-compatible
//! object storage (`object_store`, S3 API), at least once, and local files are deleted
//! only beyond a retention limit and only once their upload is confirmed.
//!
//! An [`Uploader`] task scans the recording directory every `every`: each finished file
//! (`table=*/.../part-*.parquet`) and manifest (`_manifests/*.jsonl`) not yet confirmed is
//! PUT under `<prefix>/<its path relative to the recording root>`. A PUT is idempotent, so
//! a retry or a restart only re-sends; after a restart a file is first looked up (HEAD)
//! and counted as uploaded when the copy has its size. `object_store` retries transient
//! failures with backoff; a round that still fails waits twice as long before the next
//! (up to [`MAX_BACKOFF`]). Manifests are sent again whenever they grew.
//!
//! HTTP goes through hyper with rustls and ring (the gateway's own stack), not reqwest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::{Client, connect::HttpConnector as HyperHttp};
use hyper_util::rt::TokioExecutor;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody,
    HttpResponse, HttpResponseBody, HttpService,
};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore as _, ObjectStoreExt as _, PutPayload, RetryConfig};
use sha2::{Digest as _, Sha256};

use super::manifest::{MANIFEST_DIR, Tree, file_digest};
use crate::drain::DrainWatcher;

/// Longest wait between failed rounds.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Where and how to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSettings {
    /// `http(s)://host:port` of an S3-compatible endpoint; `None`: AWS for `region`.
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix (no leading or trailing `/` needed).
    pub prefix: String,
    /// Region (signing); S3-compatible servers usually accept any.
    pub region: String,
    /// Access key id; `None`: from `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// Secret access key; `None`: from `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// How often the directory is scanned.
    pub every: Duration,
    /// Keep at most this many bytes of finished files locally: the oldest confirmed
    /// uploads are deleted beyond it (never one not confirmed, never a manifest).
    pub max_local_bytes: Option<u64>,
    /// Retries per request before a round gives up.
    pub max_retries: usize,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Files (and manifest versions) confirmed uploaded.
    pub uploaded: AtomicU64,
    /// Bytes uploaded.
    pub bytes: AtomicU64,
    /// Rounds that failed (the object store was unreachable or refused).
    pub failures: AtomicU64,
    /// Local files deleted by the retention limit after their upload was confirmed.
    pub deleted: AtomicU64,
    /// Age in seconds of the oldest finished file not yet confirmed (0 when none).
    pub lag_seconds: AtomicU64,
    /// Files waiting to be uploaded.
    pub pending: AtomicU64,
}

/// hyper + rustls (ring) as `object_store`'s HTTP client.
#[derive(Debug, Clone)]
struct HyperConnector {
    tls: rustls::ClientConfig,
}

#[derive(Debug)]
struct HyperService {
    client: Client<hyper_rustls::HttpsConnector<HyperHttp>, HttpRequestBody>,
}

impl HttpConnector for HyperConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let mut http = HyperHttp::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(https);
        Ok(HttpClient::new(HyperService { client }))
    }
}

#[async_trait]
impl HttpService for HyperService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = self.client.request(req).await.map_err(|e| {
            let kind = if e.is_connect() {
                HttpErrorKind::Connect
            } else {
                HttpErrorKind::Request
            };
            HttpError::new(kind, e)
        })?;
        Ok(response.map(|body| {
            HttpResponseBody::new(body.map_err(|e| HttpError::new(HttpErrorKind::Decode, e)))
        }))
    }
}

/// The TLS settings for an https endpoint: the roots in `ca_file`, else the system bundle
/// (`/etc/ssl/certs/ca-certificates.crt`), else none (an https endpoint then fails with a
/// certificate error naming it).
pub fn tls_for(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    const SYSTEM: &str = "/etc/ssl/certs/ca-certificates.crt";
    let roots = match ca_file {
        Some(file) => crate::tls::root_store_from_file(file).map_err(|e| e.to_string())?,
        None if Path::new(SYSTEM).exists() => {
            crate::tls::root_store_from_file(Path::new(SYSTEM)).map_err(|e| e.to_string())?
        }
        None => rustls::RootCertStore::empty(),
    };
    crate::tls::client_config(roots).map_err(|e| e.to_string())
}

/// Builds the S3 client for `settings`, with `tls` (roots) for https endpoints.
pub fn s3_store(settings: &UploadSettings, tls: rustls::ClientConfig) -> Result<AmazonS3, String> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&settings.bucket)
        .with_region(&settings.region)
        .with_http_connector(HyperConnector { tls })
        .with_retry(RetryConfig {
            max_retries: settings.max_retries,
            retry_timeout: Duration::from_secs(30),
            ..RetryConfig::default()
        });
    if let Some(endpoint) = &settings.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(id) = &settings.access_key_id {
        builder = builder.with_access_key_id(id);
    }
    if let Some(secret) = &settings.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    builder
        .build()
        .map_err(|e| format!("object storage bucket {}: {e}", settings.bucket))
}

fn key(prefix: &str, relative: &str) -> ObjectPath {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        ObjectPath::from(relative)
    } else {
        ObjectPath::from(format!("{prefix}/{relative}"))
    }
}

/// A local file the uploader knows.
struct Local {
    path: PathBuf,
    relative: String,
    size: u64,
    modified: SystemTime,
    manifest: bool,
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Finished files and manifests under `root`, oldest first.
fn scan(root: &Path) -> std::io::Result<Vec<Local>> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let in_manifests = dir.file_name().is_some_and(|n| n == MANIFEST_DIR);
            if name.starts_with('.') {
                continue;
            }
            let meta = entry.metadata()?;
            if meta.is_dir() {
                if name == MANIFEST_DIR || !name.starts_with('_') {
                    stack.push(path);
                }
                continue;
            }
            let manifest = in_manifests && name.ends_with(".jsonl");
            if manifest || (!in_manifests && name.ends_with(".parquet")) {
                found.push(Local {
                    relative: relative(root, &path),
                    path,
                    size: meta.len(),
                    modified: meta.modified()?,
                    manifest,
                });
            }
        }
    }
    found.sort_by_key(|l| l.modified);
    Ok(found)
}

/// How the uploaded copy of a manifest stands to the local one.
enum Remote {
    /// Absent, or a beginning of the local copy: upload it.
    Behind,
    /// The same bytes: nothing to upload.
    Same,
}

/// The background uploader.
pub struct Uploader {
    root: PathBuf,
    settings: UploadSettings,
    store: AmazonS3,
    stats: Arc<UploadStats>,
    /// Confirmed copies: relative path -> size.
    confirmed: HashMap<String, u64>,
    /// Of each manifest uploaded by this process: the SHA-256 of what was uploaded, which
    /// the local manifest must still start with before it goes up again.
    manifest_digests: HashMap<String, [u8; 32]>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("root", &self.root)
            .field("bucket", &self.settings.bucket)
            .finish_non_exhaustive()
    }
}

impl Uploader {
    /// An uploader of `root` (the recording directory) to `settings`' bucket.
    pub fn new(
        root: &Path,
        settings: UploadSettings,
        tls: rustls::ClientConfig,
    ) -> Result<Uploader, String> {
        let store = s3_store(&settings, tls)?;
        Ok(Uploader {
            root: root.to_path_buf(),
            settings,
            store,
            stats: Arc::new(UploadStats::default()),
            confirmed: HashMap::new(),
            manifest_digests: HashMap::new(),
        })
    }

    /// The counters, shared with `/metrics`.
    pub fn stats(&self) -> Arc<UploadStats> {
        Arc::clone(&self.stats)
    }

    /// Uploads until the drain, then makes a last round.
    pub async fn run(mut self, drain: DrainWatcher) {
        let mut wait = self.settings.every;
        loop {
            tokio::select! {
                () = drain.signaled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            wait = match self.round().await {
                Ok(()) => self.settings.every,
                Err(error) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, bucket = %self.settings.bucket, "upload round failed; retrying later");
                    backoff(wait, self.settings.every)
                }
            };
        }
        if let Err(error) = self.round().await {
            tracing::warn!(%error, "last upload round before stopping failed; the next start uploads the rest");
        }
    }

    /// One pass: upload what is not confirmed, then apply the retention limit.
    pub async fn round(&mut self) -> Result<(), String> {
        let files = scan(&self.root).map_err(|e| format!("{}: {e}", self.root.display()))?;
        let now = SystemTime::now();
        let pending: Vec<&Local> = files
            .iter()
            .filter(|f| self.confirmed.get(&f.relative) != Some(&f.size))
            .collect();
        self.stats
            .pending
            .store(pending.len() as u64, Ordering::Relaxed);
        let oldest = pending
            .iter()
            .filter(|f| !f.manifest)
            .map(|f| f.modified)
            .min();
        self.stats.lag_seconds.store(
            oldest
                .and_then(|t| now.duration_since(t).ok())
                .map_or(0, |d| d.as_secs()),
            Ordering::Relaxed,
        );
        let mut result = Ok(());
        for file in pending {
            let key = key(&self.settings.prefix, &file.relative);
            // A published data file never changes: one whose size moved after its upload
            // was confirmed was modified on the node, and the copy in object storage is the
            // evidence. It is not uploaded over (`chaperone verify` names the local file).
            if !file.manifest {
                if let Some(size) = self.confirmed.get(&file.relative) {
                    let why = format!(
                        "{} is {} bytes, but {size} were uploaded to {key}: it changed after its upload, so it is not uploaded over the copy in object storage",
                        file.path.display(),
                        file.size
                    );
                    tracing::error!("{why}");
                    result = Err(why);
                    continue;
                }
                // After a restart the copy may be there already; a different one is kept.
                match self.store.head(&key).await {
                    Ok(meta) if meta.size == file.size => {
                        self.confirmed.insert(file.relative.clone(), file.size);
                        continue;
                    }
                    Ok(meta) => {
                        let why = format!(
                            "{} is {} bytes, but {key} holds {} bytes already: not uploaded over it",
                            file.path.display(),
                            file.size,
                            meta.size
                        );
                        tracing::error!("{why}");
                        result = Err(why);
                        continue;
                    }
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        result = Err(format!(
                            "upload {}: cannot look up {key}: {e}",
                            file.path.display()
                        ));
                        break;
                    }
                }
            }
            let mut bytes = match tokio::fs::read(&file.path).await {
                Ok(bytes) => bytes,
                // Gone meanwhile (retention, or a manifest being rewritten): next round.
                Err(e) => {
                    tracing::debug!(path = %file.path.display(), error = %e, "skipped");
                    continue;
                }
            };
            // A manifest is read up to its last complete line: an entry being appended
            // (and possibly cut back) is not shipped half-written, which would leave the
            // local manifest no longer extending the uploaded copy.
            if file.manifest {
                let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                bytes.truncate(complete);
            }
            let size = bytes.len() as u64;
            let digest: Option<[u8; 32]> = file.manifest.then(|| Sha256::digest(&bytes).into());
            if file.manifest {
                match self.check_extends(&key, &file.relative, &bytes).await {
                    Ok(Remote::Behind) => {}
                    // Already there (a closed segment, after a restart): nothing to send.
                    Ok(Remote::Same) => {
                        self.confirmed.insert(file.relative.clone(), size);
                        if let Some(digest) = digest {
                            self.manifest_digests.insert(file.relative.clone(), digest);
                        }
                        continue;
                    }
                    Err(why) => {
                        // The other files still go; the round fails, so the failure shows.
                        tracing::error!(path = %file.path.display(), %key, reason = %why, "manifest not uploaded");
                        result = Err(why);
                        continue;
                    }
                }
            }
            match self
                .store
                .put(&key, PutPayload::from(Bytes::from(bytes)))
                .await
            {
                Ok(_) => {
                    self.confirmed.insert(file.relative.clone(), size);
                    if let Some(digest) = digest {
                        self.manifest_digests.insert(file.relative.clone(), digest);
                    }
                    self.stats.uploaded.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(size, Ordering::Relaxed);
                }
                Err(e) => {
                    result = Err(format!("upload {} to {key}: {e}", file.path.display()));
                    break;
                }
            }
        }
        self.retain(&files);
        if result.is_ok() {
            self.stats.pending.store(0, Ordering::Relaxed);
            self.stats.lag_seconds.store(0, Ordering::Relaxed);
        }
        result
    }

    /// A manifest is an append-only chain, and its uploaded copy is the evidence that is
    /// off the node: it is only replaced by a copy that extends it. A local manifest that
    /// does not (the node's chain was moved aside and restarted, or rewritten by someone
    /// covering their tracks) is not uploaded over it.
    async fn check_extends(
        &self,
        key: &ObjectPath,
        relative: &str,
        local: &[u8],
    ) -> Result<Remote, String> {
        if let (Some(&uploaded), Some(digest)) = (
            self.confirmed.get(relative),
            self.manifest_digests.get(relative),
        ) {
            // Uploaded by this process: what went up must still start the local copy.
            return if starts_with_uploaded(local, uploaded, digest) {
                Ok(Remote::Behind)
            } else {
                Err(format!(
                    "{key}: the local manifest ({} bytes) no longer starts with the {uploaded} bytes uploaded; it is not uploaded over them",
                    local.len()
                ))
            };
        }
        let remote = match self.store.get(key).await {
            Ok(found) => found
                .bytes()
                .await
                .map_err(|e| format!("read {key} to compare: {e}"))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(Remote::Behind),
            Err(
                e @ (object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }),
            ) => {
                return Err(format!(
                    "read {key} to compare: {e}; the uploader needs s3:GetObject on the prefix \
                     and s3:ListBucket on the bucket (S3 answers a missing key with 403 \
                     without it) to check that the local manifest extends the uploaded one"
                ));
            }
            Err(e) => return Err(format!("read {key} to compare: {e}")),
        };
        if remote.as_ref() == local {
            Ok(Remote::Same)
        } else if manifest_extends(&remote, local) {
            Ok(Remote::Behind)
        } else {
            Err(format!(
                "{key}: the local manifest does not extend the copy already uploaded ({} bytes), so it is not uploaded over it; keep both, compare them with `chaperone verify`, and move the uploaded one aside to start a new chain",
                remote.len()
            ))
        }
    }

    /// Deletes the oldest confirmed data files while the local total is over the limit.
    fn retain(&self, files: &[Local]) {
        let Some(limit) = self.settings.max_local_bytes else {
            return;
        };
        let mut total: u64 = files.iter().filter(|f| !f.manifest).map(|f| f.size).sum();
        for file in files.iter().filter(|f| !f.manifest) {
            if total <= limit {
                break;
            }
            if self.confirmed.get(&file.relative) != Some(&file.size) {
                // Never delete what is not confirmed uploaded; newer files wait behind it.
                continue;
            }
            match std::fs::remove_file(&file.path) {
                Ok(()) => {
                    total -= file.size;
                    self.stats.deleted.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(path = %file.path.display(), error = %e, "retention: cannot delete an uploaded file")
                }
            }
        }
    }
}

/// Reads the copy of a recording tree in object storage, for `chaperone verify`.
pub async fn read_remote_tree(
    settings: &UploadSettings,
    tls: rustls::ClientConfig,
) -> Result<Tree, String> {
    use futures_util::TryStreamExt as _;
    use sha2::{Digest as _, Sha256};
    let store = s3_store(settings, tls)?;
    let prefix = settings.prefix.trim_matches('/');
    let list_prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
    let objects: Vec<_> = store
        .list(list_prefix.as_ref())
        .try_collect()
        .await
        .map_err(|e| format!("list s3://{}/{prefix}: {e}", settings.bucket))?;
    let mut tree = Tree::default();
    for object in objects {
        let full = object.location.to_string();
        let relative = full
            .strip_prefix(prefix)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(&full)
            .to_owned();
        let bytes = store
            .get(&object.location)
            .await
            .map_err(|e| format!("get {full}: {e}"))?
            .bytes()
            .await
            .map_err(|e| format!("get {full}: {e}"))?;
        if let Some(name) = relative.strip_prefix(&format!("{MANIFEST_DIR}/")) {
            tree.add_manifest_file(name, String::from_utf8_lossy(&bytes).into_owned());
        } else if relative.ends_with(".parquet") {
            let digest: [u8; 32] = Sha256::digest(&bytes).into();
            let hex = digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>();
            tree.files.insert(relative, (hex, bytes.len() as u64));
        }
    }
    Ok(tree)
}

/// Hex SHA-256 and size of a local file (re-exported for tools comparing copies).
pub fn digest(path: &Path) -> std::io::Result<(String, u64)> {
    file_digest(path)
}

/// Whether `local` still starts with the `len` bytes whose SHA-256 is `digest`.
fn starts_with_uploaded(local: &[u8], len: u64, digest: &[u8; 32]) -> bool {
    usize::try_from(len)
        .ok()
        .and_then(|n| local.get(..n))
        .is_some_and(|start| <[u8; 32]>::from(Sha256::digest(start)) == *digest)
}

/// Whether `local` extends `remote`: every complete line of the uploaded copy (one read
/// while a line was being appended may end in part of one) starts the local manifest.
fn manifest_extends(remote: &[u8], local: &[u8]) -> bool {
    let complete = remote
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(&remote[..0], |end| &remote[..=end]);
    local.starts_with(complete)
}

/// The pause after a failed round: twice the last one, at most [`MAX_BACKOFF`], but never
/// shorter than the configured interval (which may be longer than `MAX_BACKOFF`).
fn backoff(last: Duration, every: Duration) -> Duration {
    (last * 2).min(MAX_BACKOFF).max(every)
}

#[cfg(test)]
mod tests {
    use sha2::{Digest as _, Sha256};

    use std::time::Duration;

    use super::{backoff, manifest_extends, starts_with_uploaded};

    #[test]
    fn a_failed_round_backs_off_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(30), s(30)), s(60));
        assert_eq!(backoff(s(60), s(30)), s(60));
        // An interval above the cap is kept, not a panic of `clamp` (min above max).
        assert_eq!(backoff(s(300), s(300)), s(300));
        assert_eq!(
            backoff(Duration::ZERO, Duration::from_millis(100)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn a_manifest_uploaded_by_this_process_must_still_start_the_local_one() {
        let uploaded = b"{\"seq\":1}\n".as_slice();
        let digest: [u8; 32] = Sha256::digest(uploaded).into();
        let len = uploaded.len() as u64;
        assert!(starts_with_uploaded(
            b"{\"seq\":1}\n{\"seq\":2}\n",
            len,
            &digest
        ));
        assert!(starts_with_uploaded(uploaded, len, &digest));
        // Rewritten to the same length or longer: refused.
        assert!(!starts_with_uploaded(
            b"{\"seq\":9}\n{\"seq\":2}\n",
            len,
            &digest
        ));
        assert!(!starts_with_uploaded(b"{\"seq\":", len, &digest));
    }

    #[test]
    fn a_manifest_is_only_uploaded_over_a_copy_it_extends() {
        let a = b"{\"seq\":1}\n".as_slice();
        let ab = b"{\"seq\":1}\n{\"seq\":2}\n".as_slice();
        assert!(manifest_extends(b"", ab), "nothing uploaded yet");
        assert!(manifest_extends(a, ab), "appended to");
        assert!(manifest_extends(ab, ab), "unchanged");
        assert!(
            !manifest_extends(ab, a),
            "shorter: entries would vanish off the node"
        );
        assert!(
            !manifest_extends(a, b"{\"seq\":9}\n"),
            "a new chain over the old one"
        );
        // A copy read while a line was being appended: its complete lines count.
        assert!(manifest_extends(b"{\"seq\":1}\n{\"se", ab));
        assert!(manifest_extends(b"{\"seq\":1}\n{\"se", a));
    }
}
