//! Content-addressed evidence files.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::evidence::{ChangedFile, Evidence, TestResult};
use crate::{Error, Result, io_err};

/// The SHA-256 of a blob, 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContentHash(String);

impl ContentHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ContentHash(hex(&Sha256::digest(bytes)))
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ContentHash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(ContentHash(s.to_owned()))
        } else {
            Err(Error::InvalidHash { value: s.to_owned() })
        }
    }
}

impl TryFrom<String> for ContentHash {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<ContentHash> for String {
    fn from(h: ContentHash) -> String {
        h.0
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an event records of a task's evidence: metadata and the hashes of the blobs (the diff,
/// the test output) in an [`EvidenceStore`]. [`EvidenceStore::get_evidence`] gives the
/// [`Evidence`] back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceRef {
    pub task_id: String,
    pub branch: String,
    pub base_commit: String,
    pub head_commit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_commit: Option<String>,
    /// The blob of the diff (`git diff <base>..<head>`).
    pub diff: ContentHash,
    /// The diff's length in bytes.
    pub diff_bytes: u64,
    pub changed_files: Vec<ChangedFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outside_locks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<TestRef>,
}

/// A test run in an [`EvidenceRef`]: its result, and its (clipped) output as a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestRef {
    pub command: String,
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    pub duration_ms: u64,
    /// The blob of the clipped output.
    pub output: ContentHash,
    /// How many bytes the command wrote in all (before clipping).
    pub output_bytes: u64,
}

/// Blobs stored by content: `<dir>/<first 2 hex digits>/<other 62>`, each written once through
/// a temporary file and a rename (never half-written), verified on every read.
#[derive(Debug, Clone)]
pub struct EvidenceStore {
    dir: PathBuf,
    fsync: bool,
}

impl EvidenceStore {
    /// A store in `dir` (created on the first `put`). Writes are made durable (fsync of the file
    /// and its directory) before `put` returns; see [`EvidenceStore::with_fsync`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), fsync: true }
    }

    /// Whether `put` waits for the disk (default `true`; tests turn it off).
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob `hash` is (or would be) stored.
    pub fn path_of(&self, hash: &ContentHash) -> PathBuf {
        self.dir.join(&hash.0[..2]).join(&hash.0[2..])
    }

    /// Stores `bytes` and returns their hash. Storing the same content again writes nothing
    /// (a stored copy found corrupted is replaced).
    pub fn put(&self, bytes: &[u8]) -> Result<ContentHash> {
        let hash = ContentHash::of(bytes);
        let path = self.path_of(&hash);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == bytes.len() as u64 => {
                if std::fs::read(&path).map_err(io_err(&path))? == bytes {
                    return Ok(hash);
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        write_atomic(&path, bytes, self.fsync)?;
        Ok(hash)
    }

    /// The blob `hash`, verified: content that does not hash to `hash` is [`Error::Corrupt`]
    /// (naming the file), a missing blob [`Error::BlobNotFound`].
    pub fn get(&self, hash: &ContentHash) -> Result<Vec<u8>> {
        let path = self.path_of(hash);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::BlobNotFound { hash: hash.0.clone(), path });
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        let actual = ContentHash::of(&bytes);
        if &actual != hash {
            return Err(Error::Corrupt { path, expected: hash.0.clone(), actual: actual.0 });
        }
        Ok(bytes)
    }

    /// Whether the blob `hash` is stored (not verified).
    pub fn contains(&self, hash: &ContentHash) -> bool {
        self.path_of(hash).is_file()
    }

    /// Stores the diff and the test output as blobs and returns the manifest for an event.
    pub fn put_evidence(&self, evidence: &Evidence) -> Result<EvidenceRef> {
        let diff = self.put(evidence.diff.as_bytes())?;
        let test = match &evidence.test {
            Some(t) => Some(TestRef {
                command: t.command.clone(),
                exit_code: t.exit_code,
                timed_out: t.timed_out,
                duration_ms: t.duration_ms,
                output: self.put(t.output.as_bytes())?,
                output_bytes: t.output_bytes,
            }),
            None => None,
        };
        Ok(EvidenceRef {
            task_id: evidence.task_id.clone(),
            branch: evidence.branch.clone(),
            base_commit: evidence.base_commit.clone(),
            head_commit: evidence.head_commit.clone(),
            auto_commit: evidence.auto_commit.clone(),
            diff,
            diff_bytes: evidence.diff.len() as u64,
            changed_files: evidence.changed_files.clone(),
            outside_locks: evidence.outside_locks.clone(),
            test,
        })
    }

    /// The evidence a manifest describes, its blobs read and verified.
    pub fn get_evidence(&self, r: &EvidenceRef) -> Result<Evidence> {
        let text = |bytes: Vec<u8>| {
            String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        };
        let diff = text(self.get(&r.diff)?);
        let test = match &r.test {
            Some(t) => Some(TestResult {
                command: t.command.clone(),
                exit_code: t.exit_code,
                timed_out: t.timed_out,
                duration_ms: t.duration_ms,
                output: text(self.get(&t.output)?),
                output_bytes: t.output_bytes,
            }),
            None => None,
        };
        Ok(Evidence {
            task_id: r.task_id.clone(),
            branch: r.branch.clone(),
            base_commit: r.base_commit.clone(),
            head_commit: r.head_commit.clone(),
            auto_commit: r.auto_commit.clone(),
            diff,
            changed_files: r.changed_files.clone(),
            outside_locks: r.outside_locks.clone(),
            test,
        })
    }
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader sees the old file or the whole new one. With `fsync`, the file and the directory are
/// flushed before returning.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], fsync: bool) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        if fsync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if fsync {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes() {
        assert_eq!(ContentHash::of(b"").as_str(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert!("../../etc/passwd".parse::<ContentHash>().is_err());
        assert!("E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855".parse::<ContentHash>().is_err());
        let h = ContentHash::of(b"x");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<ContentHash>(&json).unwrap(), h);
        assert!(serde_json::from_str::<ContentHash>("\"zz\"").is_err());
    }
}
