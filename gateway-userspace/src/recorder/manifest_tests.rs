//! Tamper evidence: a recording tree written by two nodes' recorders verifies clean, and
//! each kind of tampering is reported: a flipped byte, a truncated file, a deleted file, an
//! unlisted file, a file swapped between nodes, reordered entries and a manifest re-signed
//! with another key.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;

use super::manifest::{self, MANIFEST_DIR, Verification};
use super::tests::{full_row, ts};
use super::*;
use crate::drain;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn write_key(dir: &Path, key: &SigningKey) -> PathBuf {
    let path = dir.join("signing.pem");
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap_or_else(|e| panic!("pem: {e}"));
    std::fs::write(&path, pem.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    path
}

/// Two nodes, two files each, signed with key 1.
async fn recorded_tree() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let keys = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let key_file = write_key(keys.path(), &key(1));
    for (n, node) in ["node-a", "node-b"].into_iter().enumerate() {
        let (_trigger, watcher) = drain::channel();
        let cfg = RecorderConfig {
            signing_key_file: Some(key_file.clone()),
            ..RecorderConfig::new(root.path(), node)
        };
        let (recorder, handle) =
            Recorder::start(cfg, watcher).unwrap_or_else(|e| panic!("start: {e}"));
        for file in 0..2i64 {
            for i in 0..5i64 {
                let mut row =
                    full_row((n as i64) * 100 + file * 10 + i, ts("2026-03-01T10:00:00Z"));
                row.node = node.into();
                handle
                    .record(row)
                    .await
                    .unwrap_or_else(|e| panic!("record: {e}"));
            }
            handle
                .flush()
                .await
                .unwrap_or_else(|e| panic!("flush: {e}"));
        }
        drop(handle);
        recorder
            .join()
            .await
            .unwrap_or_else(|e| panic!("join: {e}"));
    }
    root
}

fn verify(dir: &Path, with: Option<&SigningKey>) -> Verification {
    let public = with.map(SigningKey::verifying_key);
    manifest::verify_dir(dir, public.as_ref()).unwrap_or_else(|e| panic!("verify: {e}"))
}

fn files_of(dir: &Path, node: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = list_files(dir)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&format!("node={node}/")))
        .collect();
    files.sort();
    files
}

fn assert_reports(report: &Verification, needle: &str) {
    assert!(
        report.problems.iter().any(|p| p.contains(needle)),
        "expected a problem containing {needle:?}, got {:#?}",
        report.problems
    );
}

#[tokio::test]
async fn a_clean_tree_verifies_with_and_without_the_key() {
    let tree = recorded_tree().await;
    let report = verify(tree.path(), Some(&key(1)));
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.manifests, 2);
    assert_eq!(report.entries, 4);
    assert_eq!(report.files, 4);
    assert_eq!(report.signatures_checked, 4);
    let unsigned_check = verify(tree.path(), None);
    assert!(unsigned_check.ok());
    assert_eq!(unsigned_check.signatures_checked, 0);
}

#[tokio::test]
async fn a_flipped_byte_is_reported_as_modified() {
    let tree = recorded_tree().await;
    let file = &files_of(tree.path(), "node-a")[0];
    let mut bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{e}"));
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(file, bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_reports(
        &verify(tree.path(), Some(&key(1))),
        "modified: table=requests/",
    );
    // Without the key the hash check still catches it.
    assert_reports(&verify(tree.path(), None), "modified: ");
}

#[tokio::test]
async fn a_truncated_file_is_reported() {
    let tree = recorded_tree().await;
    let file = &files_of(tree.path(), "node-b")[1];
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|f| f.set_len(len - 100))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_reports(&verify(tree.path(), None), "truncated: ");
}

#[tokio::test]
async fn a_deleted_file_is_reported_missing() {
    let tree = recorded_tree().await;
    let file = &files_of(tree.path(), "node-a")[1];
    std::fs::remove_file(file).unwrap_or_else(|e| panic!("{e}"));
    assert_reports(&verify(tree.path(), None), "missing: table=requests/");
}

#[tokio::test]
async fn an_unlisted_file_is_reported() {
    let tree = recorded_tree().await;
    let dir = files_of(tree.path(), "node-a")[0]
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    std::fs::write(dir.join("part-planted.parquet"), b"PAR1 planted PAR1")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_reports(&verify(tree.path(), None), "unlisted: ");
}

#[tokio::test]
async fn a_hidden_planted_file_is_reported_too() {
    // DuckDB's `**/*.parquet` reads hidden and underscore names: so must verify.
    for planted in ["_planted.parquet", ".planted.parquet", ".hidden/x.parquet"] {
        let tree = recorded_tree().await;
        let dir = files_of(tree.path(), "node-a")[0]
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let path = dir.join(planted);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(&path, b"PAR1 planted PAR1").unwrap_or_else(|e| panic!("{e}"));
        assert_reports(&verify(tree.path(), None), "unlisted: ");
    }
}

#[tokio::test]
async fn a_file_swapped_between_nodes_is_reported() {
    let tree = recorded_tree().await;
    let a = files_of(tree.path(), "node-a")[0].clone();
    let b = files_of(tree.path(), "node-b")[0].clone();
    // node-b's file put in place of node-a's.
    std::fs::copy(&b, &a).unwrap_or_else(|e| panic!("{e}"));
    let report = verify(tree.path(), Some(&key(1)));
    assert_reports(&report, "swapped: ");
    assert_reports(&report, "node node-b's");
    // And a copy of node-b's file under node-a's partition with its own name.
    let tree = recorded_tree().await;
    let a_dir = files_of(tree.path(), "node-a")[0]
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let b = files_of(tree.path(), "node-b")[0].clone();
    let name = b.file_name().map(ToOwned::to_owned).unwrap_or_default();
    std::fs::copy(&b, a_dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
    assert_reports(&verify(tree.path(), None), "is a copy of node node-b's");
}

fn manifest_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(MANIFEST_DIR).join(format!("node={node}.jsonl"))
}

#[tokio::test]
async fn reordered_entries_break_the_chain() {
    let tree = recorded_tree().await;
    let path = manifest_path(tree.path(), "node-a");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut lines: Vec<&str> = text.lines().collect();
    lines.swap(0, 1);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap_or_else(|e| panic!("{e}"));
    assert_reports(&verify(tree.path(), None), "chain broken");
}

#[tokio::test]
async fn a_manifest_re_signed_with_another_key_fails() {
    let tree = recorded_tree().await;
    let path = manifest_path(tree.path(), "node-a");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    // Whoever re-signs with their own key can rewrite every entry consistently...
    let wrong = key(2);
    let mut out = String::new();
    for line in text.lines() {
        let mut entry: manifest::Entry =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}"));
        let hash = entry.computed_hash();
        use base64::Engine as _;
        use ed25519_dalek::Signer as _;
        entry.sig =
            Some(base64::engine::general_purpose::STANDARD.encode(wrong.sign(&hash).to_bytes()));
        out.push_str(&serde_json::to_string(&entry).unwrap_or_else(|e| panic!("{e}")));
        out.push('\n');
    }
    std::fs::write(&path, out).unwrap_or_else(|e| panic!("{e}"));
    // ...the chain and hashes still hold, so only the signature check catches it.
    assert!(verify(tree.path(), None).ok());
    let report = verify(tree.path(), Some(&key(1)));
    assert_reports(&report, "signature does not verify");
    assert_eq!(
        report
            .problems
            .iter()
            .filter(|p| p.contains("node=node-a.jsonl"))
            .count(),
        2
    );
}

#[tokio::test]
async fn a_broken_manifest_stops_the_recorder_from_extending_it() {
    let tree = recorded_tree().await;
    let path = manifest_path(tree.path(), "node-a");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&path, format!("{}\n", lines[1])).unwrap_or_else(|e| panic!("{e}"));
    let (_trigger, watcher) = drain::channel();
    let error = Recorder::start(RecorderConfig::new(tree.path(), "node-a"), watcher)
        .err()
        .unwrap_or_else(|| panic!("a broken chain must stop the start"))
        .to_string();
    assert!(error.contains("chain is broken"), "{error}");
}

#[test]
fn garbage_keys_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("key.pem");
    std::fs::write(&path, "not a key").unwrap_or_else(|e| panic!("{e}"));
    let error = manifest::load_signing_key(&path)
        .err()
        .unwrap_or_else(|| panic!("garbage must be refused"));
    assert!(
        error.contains("key.pem") && error.contains("PKCS#8"),
        "{error}"
    );
    let error = manifest::load_public_key(&path)
        .err()
        .unwrap_or_else(|| panic!("garbage must be refused"));
    assert!(error.contains("key.pem"), "{error}");
}

/// A crash between listing a file and renaming it into view: the next start completes the
/// rename, so the tree verifies.
#[tokio::test]
async fn a_listed_file_left_hidden_by_a_crash_is_completed_at_start() {
    let tree = recorded_tree().await;
    let files = files_of(tree.path(), "node-b");
    let last = files
        .iter()
        .max_by_key(|p| p.file_name().map(ToOwned::to_owned))
        .cloned()
        .unwrap_or_default();
    let name = last
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hidden = last.with_file_name(format!(".{name}.inprogress"));
    std::fs::rename(&last, &hidden).unwrap_or_else(|e| panic!("{e}"));
    assert_reports(&verify(tree.path(), None), "missing: ");
    let (_trigger, watcher) = drain::channel();
    let (recorder, handle) = Recorder::start(RecorderConfig::new(tree.path(), "node-b"), watcher)
        .unwrap_or_else(|e| panic!("start: {e}"));
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
    assert!(last.exists(), "the rename should be completed");
    let report = verify(tree.path(), Some(&key(1)));
    assert!(report.ok(), "{:#?}", report.problems);
}

/// A crash in the middle of appending an entry leaves a line without its newline: the next
/// start cuts it off and extends the chain; the tree verifies.
#[tokio::test]
async fn a_torn_manifest_entry_is_cut_off_at_start() {
    let tree = recorded_tree().await;
    let path = manifest_path(tree.path(), "node-a");
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    text.push_str("{\"version\":1,\"node\":\"node-a\",\"se");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    let (_trigger, watcher) = drain::channel();
    let (recorder, handle) = Recorder::start(RecorderConfig::new(tree.path(), "node-a"), watcher)
        .unwrap_or_else(|e| panic!("a torn last entry must not stop the start: {e}"));
    let mut row = full_row(900, ts("2026-03-01T10:00:00Z"));
    row.node = "node-a".into();
    handle
        .record(row)
        .await
        .unwrap_or_else(|e| panic!("record: {e}"));
    drop(handle);
    recorder
        .join()
        .await
        .unwrap_or_else(|e| panic!("join: {e}"));
    let report = verify(tree.path(), None);
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.entries, 5);
}

/// Lists `n` files (numbered from `from`) in `manifest`, written under `root`.
fn list_new_files(root: &Path, manifest: &mut manifest::Manifest, from: u32, n: u32) {
    let dir = root.join("table=requests/date=2026-03-01/node=node-s");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    for i in from..from + n {
        let file = dir.join(format!("part-{i:04}.parquet"));
        std::fs::write(&file, format!("file {i}")).unwrap_or_else(|e| panic!("{e}"));
        manifest
            .append(&file, &file, 1)
            .unwrap_or_else(|e| panic!("append: {e}"));
    }
}

fn segments(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join(MANIFEST_DIR))
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{e}"))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// A long-lived node's manifest goes on in segments of a fixed number of entries, so a
/// closed segment never changes (the uploader ships only the open one); the chain runs
/// across them, a restart continues the open one, and a removed or renamed segment is
/// reported.
#[test]
fn the_chain_runs_on_across_segments() {
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let open = |root: &Path| {
        manifest::Manifest::open(root, "node-s", Some(key(1)))
            .unwrap_or_else(|e| panic!("open: {e}"))
            .segment_every(3)
    };
    let mut m = open(root.path());
    list_new_files(root.path(), &mut m, 1, 7);
    let first = "node=node-s.jsonl";
    let second = "node=node-s+00000000000000000004.jsonl";
    let third = "node=node-s+00000000000000000007.jsonl";
    fn sorted(mut names: Vec<&'static str>) -> Vec<&'static str> {
        names.sort();
        names
    }
    assert_eq!(segments(root.path()), sorted(vec![first, second, third]));
    let report = verify(root.path(), Some(&key(1)));
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!((report.manifests, report.entries), (1, 7));
    // A restart continues the open segment, then starts the next.
    drop(m);
    let mut m = open(root.path());
    list_new_files(root.path(), &mut m, 8, 3);
    assert_eq!(
        segments(root.path()),
        sorted(vec![
            first,
            second,
            third,
            "node=node-s+00000000000000000010.jsonl"
        ])
    );
    let report = verify(root.path(), Some(&key(1)));
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.entries, 10);
    let dir = root.path().join(MANIFEST_DIR);
    // A name that is no segment's is reported, not skipped: its entries would go unread.
    let stray = dir.join("node=node-s+10.jsonl");
    std::fs::write(&stray, "").unwrap_or_else(|e| panic!("{e}"));
    assert_reports(
        &verify(root.path(), None),
        "unrecognised: _manifests/node=node-s+10.jsonl is not a manifest name",
    );
    std::fs::remove_file(&stray).unwrap_or_else(|e| panic!("{e}"));
    // A closed segment renamed: reported, and the gateway does not extend the chain.
    let renamed = "node=node-s+00000000000000000005.jsonl";
    std::fs::rename(dir.join(second), dir.join(renamed)).unwrap_or_else(|e| panic!("{e}"));
    assert_reports(
        &verify(root.path(), None),
        "says it starts at entry 5, but it starts at 4",
    );
    // Removed: the chain breaks where it was.
    std::fs::remove_file(dir.join(renamed)).unwrap_or_else(|e| panic!("{e}"));
    let report = verify(root.path(), None);
    assert_reports(&report, "chain broken: entry seq 7 where 4 was expected");
    let refused = manifest::Manifest::open(root.path(), "node-s", None)
        .err()
        .unwrap_or_else(|| panic!("a manifest missing a segment was extended"));
    assert!(
        refused.to_string().contains("starts at entry 7"),
        "{refused}"
    );
}

#[test]
fn segment_names_stand_for_their_node_and_first_entry() {
    use manifest::{segment_name, segment_of};
    for (node, first) in [
        ("ip-10-0-0-1.ec2.internal", 1),
        ("n", 4097),
        ("a.b", u64::MAX),
    ] {
        assert_eq!(segment_of(&segment_name(node, first)), Some((node, first)));
    }
    for bad in [
        "node=.jsonl",
        "node=n+12.jsonl",
        "node=n+0000000000000000000x.jsonl",
        "node=n+00000000000000000001.jsonl",
        "node=+00000000000000000009.jsonl",
        "other.jsonl",
        "node=n.json",
    ] {
        assert_eq!(segment_of(bad), None, "{bad}");
    }
}
