//! Guardrail files changed by a run.
//!
//! The files that set the guardrails of later runs (the config files, the project's `.ai/`
//! tree of policies and skills, the user's policy file) are protected from tools and sandboxed
//! commands, but not every change can be stopped at its source: a shell command can *create*
//! a protected file that did not exist (a mount needs an existing path), and an agent CLI's own
//! tools run outside Descartes' sandbox. So each run's guardrail files are fingerprinted
//! (SHA-256) when it starts and when it ends; a file that changed meanwhile is flagged in
//! `<state>/guardrails.json`, and no agent runs again while a flagged file still holds what
//! the run left, until the user has looked at it and said so (`descartes config trust`). A
//! file the user edits afterwards is no longer what the run left, and the flag lapses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Runtime, RuntimeError};

/// The ledger's file name in the state directory.
pub const LEDGER: &str = "guardrails.json";

/// The guardrail files of a place and their digests (`None`: absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(BTreeMap<PathBuf, Option<String>>);

/// A guardrail file a run changed, as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flagged {
    pub path: PathBuf,
    /// What the run left (`None`: it deleted the file).
    pub digest: Option<String>,
    pub run: String,
}

fn digest(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    Some(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// Every file beneath `dir` (none when it does not exist).
fn files_beneath(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files_beneath(&path, out),
            Ok(_) => out.push(path),
            Err(_) => {}
        }
    }
}

impl Runtime {
    /// The files whose content sets the guardrails of later runs.
    pub fn guardrail_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.places.user_config.iter().cloned().collect();
        files.extend(self.places.user_config.as_ref().and_then(|u| u.parent()).map(|d| d.join("policy.yaml")));
        files.extend(self.places.project_config.iter().cloned());
        if let crate::Mode::Project { root } = &self.places.mode {
            // A file the run created counts too: the `.ai` tree is listed whole.
            files.push(root.join(".ai").join("policy.yaml"));
            files_beneath(&root.join(".ai"), &mut files);
        }
        files.sort();
        files.dedup();
        files
    }

    /// The digests of the guardrail files now.
    pub fn snapshot_guardrails(&self) -> Snapshot {
        Snapshot(self.guardrail_files().into_iter().map(|f| (f.clone(), digest(&f))).collect())
    }

    fn ledger_path(&self) -> PathBuf {
        self.places.state_dir.join(LEDGER)
    }

    /// The flagged files (an unreadable ledger flags nothing: it is rewritten on the next flag).
    pub fn flagged_guardrails(&self) -> Vec<Flagged> {
        std::fs::read(self.ledger_path()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// After run `run`: flags every guardrail file that differs from `before`; returns them.
    pub fn flag_guardrail_changes(&self, before: &Snapshot, run: &str) -> Result<Vec<PathBuf>, RuntimeError> {
        let after = self.snapshot_guardrails();
        let mut changed: Vec<Flagged> = Vec::new();
        for (path, now) in &after.0 {
            if before.0.get(path).unwrap_or(&None) != now {
                changed.push(Flagged { path: path.clone(), digest: now.clone(), run: run.to_owned() });
            }
        }
        for (path, was) in &before.0 {
            if was.is_some() && !after.0.contains_key(path) {
                changed.push(Flagged { path: path.clone(), digest: None, run: run.to_owned() });
            }
        }
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let mut ledger = self.flagged_guardrails();
        ledger.retain(|f| !changed.iter().any(|c| c.path == f.path));
        ledger.extend(changed.iter().cloned());
        let json = serde_json::to_vec_pretty(&ledger).map_err(|e| std::io::Error::other(e.to_string()))?;
        std::fs::create_dir_all(&self.places.state_dir)?;
        std::fs::write(self.ledger_path(), json)?;
        Ok(changed.into_iter().map(|c| c.path).collect())
    }

    /// Before an agent runs: refuses while a flagged file still holds what its run left.
    pub fn check_guardrails(&self) -> Result<(), RuntimeError> {
        let pending: Vec<Flagged> =
            self.flagged_guardrails().into_iter().filter(|f| digest(&f.path) == f.digest).collect();
        if pending.is_empty() {
            return Ok(());
        }
        Err(RuntimeError::GuardrailsChanged(
            pending.iter().map(|f| format!("{} (by run {})", f.path.display(), f.run)).collect::<Vec<_>>().join(", "),
        ))
    }

    /// `descartes config trust`: the user accepts the flagged files as they are; returns them.
    pub fn trust_guardrails(&self) -> Result<Vec<Flagged>, RuntimeError> {
        let flagged = self.flagged_guardrails();
        match std::fs::remove_file(self.ledger_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(flagged)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_guardrail_file_a_run_created_or_changed_blocks_agents_until_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (places, _) = Runtime::init_project(dir.path()).unwrap();
        let h = home.display().to_string();
        let env: crate::wiring::EnvFn = Arc::new(move |k: &str| (k == "DESCARTES_HOME").then(|| h.clone()));
        let rt = Runtime::with_places(dir.path().to_owned(), places, env).unwrap();
        let before = rt.snapshot_guardrails();
        // Nothing changed: nothing flagged.
        assert!(rt.flag_guardrail_changes(&before, "r0").unwrap().is_empty());
        rt.check_guardrails().unwrap();
        // The run creates `.ai/policy.yaml` (no `.ai` existed) and edits the project config.
        std::fs::create_dir_all(dir.path().join(".ai")).unwrap();
        std::fs::write(dir.path().join(".ai/policy.yaml"), "rules: []\n").unwrap();
        std::fs::write(dir.path().join(".descartes/config.toml"), "max_turns = 3\n").unwrap();
        let flagged = rt.flag_guardrail_changes(&before, "r1").unwrap();
        assert_eq!(flagged.len(), 2, "{flagged:?}");
        let err = rt.check_guardrails().unwrap_err().to_string();
        assert!(err.contains("policy.yaml (by run r1)") && err.contains("config trust"), "{err}");
        // The user edits one: that one is theirs now; the other still blocks.
        std::fs::write(dir.path().join(".descartes/config.toml"), "max_turns = 4\n").unwrap();
        let err = rt.check_guardrails().unwrap_err().to_string();
        assert!(!err.contains("config.toml"), "{err}");
        assert_eq!(rt.trust_guardrails().unwrap().len(), 2);
        rt.check_guardrails().unwrap();
    }
}
