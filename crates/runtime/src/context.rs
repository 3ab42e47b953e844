//! Rules and context files loaded into the system prompt.
//!
//! Files, in each directory in this order: `AGENTS.md`, `CLAUDE.md`, `.cursorrules`,
//! `.windsurfrules`. Scopes, in this order (a later one is more specific and, where rules
//! conflict, takes precedence; the prompt says so):
//! 1. global: the user config directory (the directory of the user `config.toml`, e.g.
//!    `$DESCARTES_HOME` or `~/.config/descartes`);
//! 2. project: the project root (project mode: the directory holding `.descartes/`; direct mode:
//!    the nearest git root above the working directory, else the working directory);
//! 3. the working directory, when it is not the project root;
//! 4. session: files given with `--rules FILE` (in the order given).
//!
//! Each file is cut at `max_file_bytes`; files past `max_total_bytes` in all are left out (and
//! named as left out).

use std::path::{Path, PathBuf};

use crate::Runtime;

/// The rules file names, in the order they are read within a directory.
pub const RULES_FILES: &[&str] = &["AGENTS.md", "CLAUDE.md", ".cursorrules", ".windsurfrules"];

/// One loaded rules file.
#[derive(Debug, Clone, PartialEq)]
pub struct RulesFile {
    /// `global`, `project`, `directory` or `session`.
    pub scope: &'static str,
    pub path: PathBuf,
    pub text: String,
    /// The file was longer than the per-file bound.
    pub truncated: bool,
}

/// Bounds of what is loaded.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_file_bytes: usize,
    pub max_total_bytes: usize,
}

/// The directories rules are read from, with their scopes, in order.
pub fn rule_dirs(global_dir: Option<&Path>, project_root: &Path, cwd: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut dirs: Vec<(&'static str, PathBuf)> = Vec::new();
    if let Some(g) = global_dir {
        dirs.push(("global", g.to_owned()));
    }
    dirs.push(("project", project_root.to_owned()));
    if cwd != project_root {
        dirs.push(("directory", cwd.to_owned()));
    }
    dirs
}

/// Rules files found in `dirs`, then the `session` files, bounded. A file that cannot be read
/// is skipped; a session file that cannot be read is an error.
pub fn load_rules(
    dirs: Vec<(&'static str, PathBuf)>,
    session: &[PathBuf],
    bounds: Bounds,
) -> std::io::Result<(Vec<RulesFile>, Vec<PathBuf>)> {
    let mut candidates: Vec<(&'static str, PathBuf, bool)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (scope, dir) in dirs {
        for name in RULES_FILES {
            let path = dir.join(name);
            if path.is_file() && seen.insert(path.canonicalize().unwrap_or_else(|_| path.clone())) {
                candidates.push((scope, path, false));
            }
        }
    }
    for path in session {
        candidates.push(("session", path.clone(), true));
    }
    let mut loaded = Vec::new();
    let mut left_out = Vec::new();
    let mut total = 0usize;
    for (scope, path, required) in candidates {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if required => {
                return Err(std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())));
            }
            Err(_) => continue,
        };
        let text = String::from_utf8_lossy(&bytes);
        let (mut text, mut truncated) = (text.into_owned(), false);
        if text.len() > bounds.max_file_bytes {
            let mut cut = bounds.max_file_bytes;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            truncated = true;
        }
        if text.trim().is_empty() {
            continue;
        }
        if total + text.len() > bounds.max_total_bytes {
            left_out.push(path);
            continue;
        }
        total += text.len();
        loaded.push(RulesFile { scope, path, text, truncated });
    }
    Ok((loaded, left_out))
}

/// The system-prompt section holding the rules files (empty when there are none).
pub fn render_rules(files: &[RulesFile], left_out: &[PathBuf]) -> String {
    if files.is_empty() && left_out.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n\n# Rules and context files\nFollow these instructions. They are in order from the most general (global) \
         to the most specific (session); where they conflict, the later one wins.\n",
    );
    for f in files {
        out.push_str(&format!("\n## {} ({})\n\n{}", f.path.display(), f.scope, f.text.trim_end()));
        if f.truncated {
            out.push_str("\n[… cut: the file is longer than the configured bound]");
        }
        out.push('\n');
    }
    for p in left_out {
        out.push_str(&format!("\n(left out, over the size bound: {})\n", p.display()));
    }
    out
}

impl Runtime {
    /// The project root rules are read from: the project's root in project mode, else the
    /// nearest git root above the working directory, else the working directory.
    pub fn rules_root(&self) -> PathBuf {
        match &self.places.mode {
            crate::Mode::Project { root } => root.clone(),
            crate::Mode::Direct => {
                self.cwd.ancestors().find(|d| d.join(".git").exists()).unwrap_or(&self.cwd).to_owned()
            }
        }
    }

    /// The rules files for this working directory plus `session` files, as configured.
    pub fn rules(&self, session: &[PathBuf]) -> std::io::Result<(Vec<RulesFile>, Vec<PathBuf>)> {
        let c = &self.config.context;
        if !c.rules && session.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let bounds = Bounds { max_file_bytes: c.max_file_bytes, max_total_bytes: c.max_total_bytes };
        let dirs = if c.rules {
            rule_dirs(self.places.user_config.as_deref().and_then(Path::parent), &self.rules_root(), &self.cwd)
        } else {
            Vec::new()
        };
        load_rules(dirs, session, bounds)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn order_scopes_and_bounds() {
        let t = tempfile::tempdir().unwrap();
        let (g, p) = (t.path().join("g"), t.path().join("p"));
        let sub = p.join("sub");
        std::fs::create_dir_all(&g).unwrap();
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(g.join("AGENTS.md"), "global rule").unwrap();
        std::fs::write(p.join(".cursorrules"), "cursor rule").unwrap();
        std::fs::write(p.join("AGENTS.md"), "project rule").unwrap();
        std::fs::write(sub.join("CLAUDE.md"), "x".repeat(100)).unwrap();
        let s = t.path().join("session.md");
        std::fs::write(&s, "session rule").unwrap();
        let bounds = Bounds { max_file_bytes: 50, max_total_bytes: 1000 };
        let (files, left) = load_rules(rule_dirs(Some(&g), &p, &sub), std::slice::from_ref(&s), bounds).unwrap();
        let texts: Vec<_> = files.iter().map(|f| (f.scope, f.text.chars().take(12).collect::<String>())).collect();
        assert_eq!(
            texts,
            vec![
                ("global", "global rule".into()),
                ("project", "project rule".into()),
                ("project", "cursor rule".into()),
                ("directory", "xxxxxxxxxxxx".into()),
                ("session", "session rule".into()),
            ]
        );
        assert!(files[3].truncated && files[3].text.len() == 50);
        assert!(left.is_empty());
        let small = Bounds { max_file_bytes: 50, max_total_bytes: 40 };
        let (files, left) = load_rules(rule_dirs(Some(&g), &p, &sub), &[], small).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        assert_eq!(left, vec![sub.join("CLAUDE.md")]);
        assert!(render_rules(&files, &left).contains("left out"));
        assert!(load_rules(rule_dirs(None, &p, &p), &[t.path().join("missing")], bounds).is_err());
    }
}
