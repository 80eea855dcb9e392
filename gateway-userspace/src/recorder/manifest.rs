//! Tamper evidence: every finished Parquet file is listed, with its SHA-256, in a per-node
//! manifest whose entries chain the previous entry's hash and are signed with an ed25519
//! key; [`verify_dir`] checks a recording tree against its manifests.
//!
//! The manifest of node `N` is `<dir>/_manifests/node=N.jsonl` (the leading underscore
//! keeps dataset readers such as pyarrow out of it), continued every [`SEGMENT_ENTRIES`]
//! entries in `node=N+S.jsonl`, where `S` is the segment's first `seq` in 20 digits (`+`
//! appears in no node name), so a closed segment never changes and the uploader ships
//! only the open one. One JSON object per line:
//!
//! ```json
//! {"version":1,"node":"N","seq":1,"file":"table=requests/date=2026-12-03/node=N/part-<id>.parquet",
//!  "bytes":12345,"sha256":"<hex>","rows":100,"time":"2026-12-03T21:30:00Z",
//!  "prev":"<hex hash of entry seq-1, 64 zeros for the first>","hash":"<hex>","sig":"<base64>"}
//! ```
//!
//! `hash` is the SHA-256 of the text `chaperone-manifest-v1` followed by `node`, `seq`,
//! `file`, `bytes`, `sha256`, `rows`, `time` and `prev`, each on its own line; `sig` is the
//! ed25519 signature of those 32 hash bytes (absent when no key is configured). Changing,
//! removing, inserting or reordering an entry breaks the chain; re-signing it needs the key.
//! docs/evidence.md describes the format and what `chaperone verify` reports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::RecorderError;

/// Directory of the manifests under the recording root.
pub const MANIFEST_DIR: &str = "_manifests";
/// What every entry hash starts with (the format version).
const DOMAIN: &str = "chaperone-manifest-v1";
/// Entries per manifest segment (about 1.7 MB): then the chain goes on in a new file.
pub const SEGMENT_ENTRIES: u64 = 4096;
/// `prev` of a manifest's first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One line of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Format version (1).
    pub version: u32,
    /// The node whose gateway wrote the file.
    pub node: String,
    /// Position in the manifest, from 1.
    pub seq: u64,
    /// The file, relative to the recording root, with `/` separators.
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// Hex SHA-256 of its contents.
    pub sha256: String,
    /// Rows it holds.
    pub rows: u64,
    /// When it was listed (RFC 3339, UTC).
    pub time: String,
    /// `hash` of the previous entry ([`GENESIS`] for the first).
    pub prev: String,
    /// Hex SHA-256 over the fields above (see the module docs).
    pub hash: String,
    /// Base64 ed25519 signature of the hash bytes; `None` when unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl Entry {
    /// The hash this entry's fields give (what `hash` must say).
    pub fn computed_hash(&self) -> [u8; 32] {
        let text = format!(
            "{DOMAIN}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.node,
            self.seq,
            self.file,
            self.bytes,
            self.sha256,
            self.rows,
            self.time,
            self.prev
        );
        Sha256::digest(text.as_bytes()).into()
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> RecorderError {
    RecorderError::Io {
        op,
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

/// Hex SHA-256 and size of a file.
pub fn file_digest(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

/// Reads the ed25519 signing key (PKCS#8 PEM, as `openssl genpkey -algorithm ed25519`
/// writes it).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| {
        format!(
            "{}: not an ed25519 private key in PKCS#8 PEM (openssl genpkey -algorithm ed25519): {e}",
            path.display()
        )
    })
}

/// Reads an ed25519 public key (SubjectPublicKeyInfo PEM, as `openssl pkey -pubout`
/// writes it).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| {
        format!(
            "{}: not an ed25519 public key in PEM (openssl pkey -pubout): {e}",
            path.display()
        )
    })
}

/// The node and first `seq` a manifest file name (`node=N.jsonl`, `node=N+S.jsonl`)
/// stands for; `None` for any other name.
pub fn segment_of(name: &str) -> Option<(&str, u64)> {
    let stem = name.strip_prefix("node=")?.strip_suffix(".jsonl")?;
    match stem.rsplit_once('+') {
        Some((node, first)) => {
            let first = (first.len() == 20 && first.bytes().all(|b| b.is_ascii_digit()))
                .then(|| first.parse().ok())
                .flatten()?;
            (!node.is_empty() && first > 1).then_some((node, first))
        }
        None => (!stem.is_empty()).then_some((stem, 1)),
    }
}

/// The file name of `node`'s manifest segment starting at `first`.
pub fn segment_name(node: &str, first: u64) -> String {
    if first <= 1 {
        format!("node={node}.jsonl")
    } else {
        format!("node={node}+{first:020}.jsonl")
    }
}

/// The manifest of one node, appended as files are published.
pub struct Manifest {
    root: PathBuf,
    path: PathBuf,
    node: String,
    key: Option<SigningKey>,
    seq: u64,
    prev: String,
    /// Entries in the open segment (`path`).
    in_segment: u64,
    /// Entries per segment ([`SEGMENT_ENTRIES`]; fewer in tests).
    segment_entries: u64,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("path", &self.path)
            .field("seq", &self.seq)
            .field("signed", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

impl Manifest {
    /// Opens (or creates) `node`'s manifest under the recording `root` and continues its
    /// chain. A manifest whose last entries do not chain refuses the start: the gateway
    /// does not extend a chain it cannot vouch for.
    pub fn open(
        root: &Path,
        node: &str,
        key: Option<SigningKey>,
    ) -> Result<Manifest, RecorderError> {
        let dir = root.join(MANIFEST_DIR);
        super::durable::create_dir_all(&dir)
            .map_err(|e| io_error("create manifest directory", &dir, e))?;
        // The node's segments, in chain order; the last is the open one.
        let mut segments: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_error("read manifests", &dir, e))? {
            let entry = entry.map_err(|e| io_error("read manifests", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((n, first)) = segment_of(&name)
                && n == node
            {
                segments.push((first, entry.path()));
            }
        }
        segments.sort();
        let mut seq = 0;
        let mut prev = GENESIS.to_owned();
        let mut last = None;
        let mut in_segment = 0;
        if let Some((_, open)) = segments.last() {
            drop_torn_line(open)?;
        }
        for (first, path) in &segments {
            let broken = |why: String| RecorderError::Manifest {
                path: path.clone(),
                reason: why,
            };
            if *first != seq + 1 {
                return Err(broken(format!(
                    "the chain is broken: this segment starts at entry {first}, the one before ended at {seq} (a segment removed or renamed); move the manifests aside to start a new chain"
                )));
            }
            in_segment = 0;
            let file = File::open(path).map_err(|e| io_error("read manifest", path, e))?;
            for (n, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| io_error("read manifest", path, e))?;
                if line.trim().is_empty() {
                    continue;
                }
                let at = |why: String| broken(format!("line {}: {why}", n + 1));
                let entry: Entry = serde_json::from_str(&line)
                    .map_err(|e| at(format!("not a manifest entry: {e}")))?;
                if entry.seq != seq + 1 || entry.prev != prev {
                    return Err(at(
                        "the chain is broken (entries removed, inserted or reordered); move the manifest aside to start a new chain".into(),
                    ));
                }
                seq = entry.seq;
                prev.clone_from(&entry.hash);
                in_segment += 1;
                last = Some(entry);
            }
        }
        if let Some(entry) = last {
            complete_rename(root, &entry)?;
        }
        let path = match segments.pop() {
            Some((_, path)) => path,
            None => dir.join(segment_name(node, 1)),
        };
        Ok(Manifest {
            root: root.to_path_buf(),
            path,
            node: node.to_owned(),
            key,
            seq,
            prev,
            in_segment,
            segment_entries: SEGMENT_ENTRIES,
        })
    }

    /// Starts a new segment every `n` entries instead of [`SEGMENT_ENTRIES`].
    #[cfg(test)]
    pub(crate) fn segment_every(mut self, n: u64) -> Self {
        self.segment_entries = n;
        self
    }

    /// Lists a finished file durably: `contents` is where it is now (its synced temporary),
    /// `file` where it is published.
    pub fn append(&mut self, contents: &Path, file: &Path, rows: u64) -> Result<(), RecorderError> {
        let entry = self.entry(contents, file, rows, self.seq + 1, &self.prev)?;
        // The open segment is full: the chain goes on in a new file (its first entry
        // chains the last of this one), and this one never changes again.
        let (path, in_segment) = if self.in_segment >= self.segment_entries {
            let dir = self.path.parent().unwrap_or(&self.root);
            (dir.join(segment_name(&self.node, entry.seq)), 0)
        } else {
            (self.path.clone(), self.in_segment)
        };
        let line = serde_json::to_string(&entry).map_err(|e| RecorderError::Manifest {
            path: path.clone(),
            reason: format!("cannot encode an entry: {e}"),
        })?;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_error("append to manifest", &path, e))?;
        let before = file
            .metadata()
            .map_err(|e| io_error("append to manifest", &path, e))?
            .len();
        let written = file
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| file.sync_data())
            .and_then(|()| match path.parent() {
                // The chain's first entry must not vanish with the file's name after a
                // crash; a failure here is a failed append like any other.
                Some(dir) if before == 0 => super::durable::sync_dir(dir),
                _ => Ok(()),
            });
        if let Err(e) = written {
            // A partial line (disk full) must not stay in front of the next entry.
            if let Err(cut) = file.set_len(before).and_then(|()| file.sync_data()) {
                tracing::warn!(path = %path.display(), error = %cut, "cannot cut a failed entry off the manifest; it is dropped at the next start");
            }
            return Err(io_error("append to manifest", &path, e));
        }
        self.seq = entry.seq;
        self.prev = entry.hash;
        self.path = path;
        self.in_segment = in_segment + 1;
        Ok(())
    }

    fn entry(
        &self,
        contents: &Path,
        file: &Path,
        rows: u64,
        seq: u64,
        prev: &str,
    ) -> Result<Entry, RecorderError> {
        let (sha256, bytes) =
            file_digest(contents).map_err(|e| io_error("hash for the manifest", contents, e))?;
        let relative = file
            .strip_prefix(&self.root)
            .unwrap_or(file)
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        let mut entry = Entry {
            version: 1,
            node: self.node.clone(),
            seq,
            file: relative,
            bytes,
            sha256,
            rows,
            time: jiff::Timestamp::now().to_string(),
            prev: prev.to_owned(),
            hash: String::new(),
            sig: None,
        };
        let hash = entry.computed_hash();
        entry.hash = hex(&hash);
        entry.sig = self.key.as_ref().map(|key| {
            base64::engine::general_purpose::STANDARD.encode(key.sign(&hash).to_bytes())
        });
        Ok(entry)
    }
}

/// The gateway stopped in the middle of appending an entry: the last line has no newline.
/// It is cut off (its file was never renamed into view, so nothing else refers to it).
fn drop_torn_line(path: &Path) -> Result<(), RecorderError> {
    let bytes = fs::read(path).map_err(|e| io_error("read manifest", path, e))?;
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |at| at + 1);
    tracing::warn!(path = %path.display(), offset = keep, "manifest ends in a torn entry (the gateway stopped mid-write); cutting it off");
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| {
            f.set_len(keep as u64)?;
            f.sync_data()
        })
        .map_err(|e| io_error("cut a torn manifest entry", path, e))
}

/// The gateway stopped between listing a file and renaming it into view: finish the rename
/// when the hidden temporary still holds exactly what the entry lists.
fn complete_rename(root: &Path, entry: &Entry) -> Result<(), RecorderError> {
    let path = root.join(&entry.file);
    if path.exists() {
        return Ok(());
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let temp = dir.join(format!(".{}.inprogress", name.to_string_lossy()));
    match file_digest(&temp) {
        Ok((sha256, _)) if sha256 == entry.sha256 => {
            fs::rename(&temp, &path).map_err(|e| io_error("complete a listed file", &path, e))?;
            super::durable::sync_dir(dir).map_err(|e| io_error("sync directory", dir, e))?;
            tracing::info!(path = %path.display(), "completed the publication of a listed file");
            Ok(())
        }
        // Nothing to complete: `chaperone verify` reports the entry's file missing.
        _ => Ok(()),
    }
}

/// What [`verify_dir`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    /// Manifests read (nodes; a manifest may span several segment files).
    pub manifests: usize,
    /// Entries read.
    pub entries: usize,
    /// Files hashed.
    pub files: usize,
    /// Signatures checked (0 when no public key was given).
    pub signatures_checked: usize,
    /// Every problem, one sentence each naming the file or manifest line.
    pub problems: Vec<String>,
}

impl Verification {
    /// No problem found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A recording tree as [`verify_dir`] checks it: manifests by node, and each finished file
/// with its digest. Files come from a directory or from object storage.
#[derive(Debug, Default)]
pub struct Tree {
    /// Manifest text by node, segment by segment (by the `seq` each starts at).
    pub manifests: BTreeMap<String, BTreeMap<u64, String>>,
    /// Finished files (relative path) with their hex SHA-256 and size.
    pub files: BTreeMap<String, (String, u64)>,
    /// Files under `_manifests/` whose names are no manifest's: reported, since entries
    /// there would otherwise go unread.
    pub unrecognised: Vec<String>,
}

impl Tree {
    /// Takes in a file found under `_manifests/` (`name` without the directory).
    pub fn add_manifest_file(&mut self, name: &str, text: String) {
        match segment_of(name) {
            Some((node, first)) => {
                self.manifests
                    .entry(node.to_owned())
                    .or_default()
                    .insert(first, text);
            }
            None => self.unrecognised.push(format!("{MANIFEST_DIR}/{name}")),
        }
    }
}

/// Reads a local recording tree.
pub fn read_tree(dir: &Path) -> Result<Tree, String> {
    let mut tree = Tree::default();
    let manifests = dir.join(MANIFEST_DIR);
    if manifests.is_dir() {
        for entry in
            fs::read_dir(&manifests).map_err(|e| format!("{}: {e}", manifests.display()))?
        {
            let entry = entry.map_err(|e| format!("{}: {e}", manifests.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() {
                tree.unrecognised.push(format!("{MANIFEST_DIR}/{name}/"));
                continue;
            }
            let text = fs::read_to_string(entry.path())
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
            tree.add_manifest_file(&name, text);
        }
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let entry = entry.map_err(|e| format!("{}: {e}", d.display()))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Every `*.parquet` is looked at, hidden or not: DuckDB's and pyarrow's globs
            // read `_x.parquet` and `.x.parquet` too, so a planted one must show as
            // unlisted. (Files being written end in `.inprogress`, kept failures in
            // `.failed`.)
            if path.is_dir() {
                if path != manifests {
                    stack.push(path);
                }
            } else if name.ends_with(".parquet") {
                let digest = file_digest(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let relative = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                tree.files.insert(relative, digest);
            }
        }
    }
    Ok(tree)
}

/// Checks a local recording tree (see [`verify_tree`]).
pub fn verify_dir(dir: &Path, key: Option<&VerifyingKey>) -> Result<Verification, String> {
    Ok(verify_tree(&read_tree(dir)?, key))
}

/// Checks every manifest's chain (and signatures, given the public key), every listed
/// file's presence, size and hash, and that every finished file is listed, in its own
/// node's manifest.
pub fn verify_tree(tree: &Tree, key: Option<&VerifyingKey>) -> Verification {
    let mut report = Verification {
        manifests: tree.manifests.len(),
        files: tree.files.len(),
        ..Verification::default()
    };
    for name in &tree.unrecognised {
        report.problems.push(format!(
            "unrecognised: {name} is not a manifest name (node=N.jsonl or node=N+S.jsonl), so nothing in it is checked"
        ));
    }
    // sha256 -> (node, file) of every entry, to name a file's origin.
    let mut by_hash: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut listed: BTreeSet<String> = BTreeSet::new();
    for (node, segments) in &tree.manifests {
        let mut expect_seq = 1;
        let mut prev = GENESIS.to_owned();
        let lines = segments.iter().flat_map(|(first, text)| {
            let name = format!("{MANIFEST_DIR}/{}", segment_name(node, *first));
            text.lines().enumerate().map(move |(n, line)| {
                let starts = (n == 0).then_some(*first);
                (format!("{name} line {}", n + 1), line, starts)
            })
        });
        for (at, line, starts) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let entry: Entry = match serde_json::from_str(line) {
                Ok(entry) => entry,
                Err(e) => {
                    report
                        .problems
                        .push(format!("{at}: not a manifest entry: {e}"));
                    continue;
                }
            };
            report.entries += 1;
            if let Some(first) = starts
                && entry.seq != first
            {
                report.problems.push(format!(
                    "{at}: the segment's name says it starts at entry {first}, but it starts at {} (a segment renamed)",
                    entry.seq
                ));
            }
            if hex(&entry.computed_hash()) != entry.hash {
                report.problems.push(format!(
                    "{at}: modified entry: its hash does not match its fields ({})",
                    entry.file
                ));
            }
            if entry.seq != expect_seq || entry.prev != prev {
                report.problems.push(format!(
                    "{at}: chain broken: entry seq {} where {expect_seq} was expected, or its prev is not the previous entry's hash (entries removed, inserted or reordered)",
                    entry.seq
                ));
            }
            expect_seq = entry.seq + 1;
            prev.clone_from(&entry.hash);
            if entry.node != *node {
                report.problems.push(format!(
                    "{at}: entry names node {} in node {node}'s manifest",
                    entry.node
                ));
            }
            if !entry.file.contains(&format!("/node={node}/")) {
                report.problems.push(format!(
                    "{at}: {} is not in node {node}'s partition",
                    entry.file
                ));
            }
            if let Some(key) = key {
                report.signatures_checked += 1;
                match signature_ok(&entry, key) {
                    Ok(()) => {}
                    Err(why) => report.problems.push(format!("{at}: {why}")),
                }
            }
            by_hash.insert(entry.sha256.clone(), (node.clone(), entry.file.clone()));
            listed.insert(entry.file.clone());
            match tree.files.get(&entry.file) {
                None => report
                    .problems
                    .push(format!("missing: {} (listed at {at})", entry.file)),
                Some((sha256, bytes)) if *sha256 != entry.sha256 => {
                    let how = if *bytes < entry.bytes {
                        format!(
                            "truncated: {} has {bytes} of {} bytes",
                            entry.file, entry.bytes
                        )
                    } else {
                        format!("modified: {} does not match its SHA-256", entry.file)
                    };
                    report.problems.push(format!("{how} (listed at {at})"));
                }
                Some(_) => {}
            }
        }
    }
    // A file whose content is another listed file's: say where it came from.
    for (file, (sha256, _)) in &tree.files {
        let origin = by_hash.get(sha256);
        if !listed.contains(file) {
            match origin {
                Some((node, original)) => report.problems.push(format!(
                    "unlisted: {file} is a copy of node {node}'s {original} (a file swapped between nodes or partitions)"
                )),
                None => report
                    .problems
                    .push(format!("unlisted: {file} is in no manifest")),
            }
        } else if let Some((node, original)) = origin
            && original != file
        {
            report.problems.push(format!(
                "swapped: {file} holds the contents of node {node}'s {original}"
            ));
        }
    }
    report
}

fn signature_ok(entry: &Entry, key: &VerifyingKey) -> Result<(), String> {
    let Some(sig) = &entry.sig else {
        return Err("unsigned entry (no signature), but a public key was given".into());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sig)
        .map_err(|e| format!("signature is not base64: {e}"))?;
    let signature =
        Signature::from_slice(&bytes).map_err(|e| format!("signature is malformed: {e}"))?;
    let hash = entry.computed_hash();
    key.verify(&hash, &signature).map_err(|_| {
        "signature does not verify with the given public key (signed with another key, or the entry was changed)".to_owned()
    })
}
