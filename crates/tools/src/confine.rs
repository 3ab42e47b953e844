//! Workspace confinement: every path a file tool touches is resolved against the workspace
//! roots (the run's working directory plus the roots added in config) and refused when it
//! leads outside them, through `..`, an absolute path or a symlink.
//!
//! The existing part of a path is canonicalized (symlinks resolved); the part that does not
//! exist yet (a file about to be written) is appended by name and may not contain `..`. A
//! dangling symlink is refused: writing through it would create its target, wherever it is.

use std::path::{Component, Path, PathBuf};

use crate::protect::Protected;

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfineError {
    #[error("path `{path}` is outside the workspace (allowed roots: {roots}); add a root in config to allow it")]
    Outside { path: String, roots: String },
    #[error("path `{path}` goes through a symlink that points nowhere (`{link}`); refused")]
    DanglingSymlink { path: String, link: String },
    #[error("path `{path}` uses `..` below a directory that does not exist")]
    DotDotInMissing { path: String },
    #[error("cannot resolve path `{path}`: {message}")]
    Io { path: String, message: String },
    #[error("path is empty")]
    Empty,
    #[error("{message}")]
    Protected { message: String },
}

/// The roots a call may touch: the run's cwd and the configured extra roots.
#[derive(Debug, Clone, Default)]
pub struct Workspace {
    /// Roots added in config, beside the run's cwd.
    pub extra_roots: Vec<PathBuf>,
    /// Paths no tool may write (Descartes' state, config, policy, git control files).
    pub protected: Protected,
}

impl Workspace {
    pub fn new(extra_roots: Vec<PathBuf>) -> Self {
        Self { extra_roots, protected: Protected::none() }
    }

    /// With Descartes' protected paths.
    pub fn protecting(mut self, protected: Protected) -> Self {
        self.protected = protected;
        self
    }

    /// Resolves `path` like [`Workspace::resolve`] for a write: a protected path is refused.
    pub fn resolve_write(&self, cwd: &Path, path: &str) -> Result<PathBuf, ConfineError> {
        let resolved = self.resolve(cwd, path)?;
        let roots: Vec<PathBuf> = self.canonical_roots(cwd);
        let roots: Vec<&Path> = roots.iter().map(PathBuf::as_path).collect();
        self.protected.check_write(&resolved, &roots).map_err(|message| ConfineError::Protected { message })?;
        Ok(resolved)
    }

    /// Resolves `path` (relative to `cwd`, or absolute) to a canonical path inside a root.
    pub fn resolve(&self, cwd: &Path, path: &str) -> Result<PathBuf, ConfineError> {
        if path.is_empty() {
            return Err(ConfineError::Empty);
        }
        let joined = if Path::new(path).is_absolute() { PathBuf::from(path) } else { cwd.join(path) };
        let resolved = canonicalize_lenient(&joined, path)?;
        self.protected.check_read(&resolved).map_err(|message| ConfineError::Protected { message })?;
        let roots = self.canonical_roots(cwd);
        if roots.iter().any(|r| resolved.starts_with(r)) {
            return Ok(resolved);
        }
        Err(ConfineError::Outside {
            path: path.to_owned(),
            roots: roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The roots, canonicalized (a root that does not exist is left out).
    pub fn canonical_roots(&self, cwd: &Path) -> Vec<PathBuf> {
        std::iter::once(cwd)
            .chain(self.extra_roots.iter().map(PathBuf::as_path))
            .filter_map(|r| r.canonicalize().ok())
            .collect()
    }

    /// Shows `abs` relative to `cwd` when it is below it, else as it is.
    pub fn display(cwd: &Path, abs: &Path) -> String {
        let base = cwd.canonicalize().unwrap_or_else(|_| cwd.to_owned());
        match abs.strip_prefix(&base) {
            Ok(rel) if rel.as_os_str().is_empty() => ".".into(),
            Ok(rel) => rel.display().to_string(),
            Err(_) => abs.display().to_string(),
        }
    }
}

/// Canonicalizes the longest existing ancestor of `p` and appends the rest.
fn canonicalize_lenient(p: &Path, shown: &str) -> Result<PathBuf, ConfineError> {
    let mut existing = p.to_owned();
    let mut missing: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match std::fs::symlink_metadata(&existing) {
            Ok(meta) => {
                let canon = match existing.canonicalize() {
                    Ok(c) => c,
                    Err(_) if meta.file_type().is_symlink() => {
                        return Err(ConfineError::DanglingSymlink {
                            path: shown.to_owned(),
                            link: existing.display().to_string(),
                        });
                    }
                    Err(e) => return Err(ConfineError::Io { path: shown.to_owned(), message: e.to_string() }),
                };
                let mut out = canon;
                for name in missing.iter().rev() {
                    out.push(name);
                }
                return Ok(out);
            }
            Err(_) => {
                let Some(last) = existing.components().next_back() else {
                    return Err(ConfineError::Io { path: shown.to_owned(), message: "no existing ancestor".into() });
                };
                match last {
                    Component::Normal(name) => missing.push(name.to_owned()),
                    Component::CurDir => {}
                    Component::ParentDir => return Err(ConfineError::DotDotInMissing { path: shown.to_owned() }),
                    Component::RootDir | Component::Prefix(_) => {
                        return Err(ConfineError::Io {
                            path: shown.to_owned(),
                            message: "no existing ancestor".into(),
                        });
                    }
                }
                if !existing.pop() {
                    return Err(ConfineError::Io { path: shown.to_owned(), message: "no existing ancestor".into() });
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(ws.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), "s").unwrap();
        std::fs::write(ws.join("sub/a.txt"), "a").unwrap();
        (dir, ws, outside)
    }

    #[test]
    fn inside_paths_resolve() {
        let (_d, ws, _o) = setup();
        let w = Workspace::default();
        let canon = ws.canonicalize().unwrap();
        assert_eq!(w.resolve(&ws, "sub/a.txt").unwrap(), canon.join("sub/a.txt"));
        assert_eq!(w.resolve(&ws, "sub/../sub/./a.txt").unwrap(), canon.join("sub/a.txt"));
        assert_eq!(w.resolve(&ws, "new/dir/file.txt").unwrap(), canon.join("new/dir/file.txt"));
        assert_eq!(w.resolve(&ws, ".").unwrap(), canon);
        let abs = ws.join("sub/a.txt");
        assert_eq!(w.resolve(&ws, abs.to_str().unwrap()).unwrap(), canon.join("sub/a.txt"));
        // A symlink that stays inside is fine.
        std::os::unix::fs::symlink(ws.join("sub"), ws.join("link")).unwrap();
        assert_eq!(w.resolve(&ws, "link/a.txt").unwrap(), canon.join("sub/a.txt"));
    }

    #[test]
    fn escapes_are_refused() {
        let (_d, ws, outside) = setup();
        let w = Workspace::default();
        for p in ["../outside/secret.txt", "../outside/new.txt", "sub/../../outside", "/etc/passwd", "/"] {
            let err = w.resolve(&ws, p).unwrap_err();
            assert!(matches!(err, ConfineError::Outside { .. }), "{p}: {err}");
            assert!(err.to_string().contains("is outside the workspace"), "{err}");
        }
        let abs = outside.join("secret.txt");
        assert!(matches!(w.resolve(&ws, abs.to_str().unwrap()), Err(ConfineError::Outside { .. })));
        // Symlinks leading out: to a directory, to a file, and through them to a new file.
        std::os::unix::fs::symlink(&outside, ws.join("out")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret.txt"), ws.join("s.txt")).unwrap();
        for p in ["out", "out/secret.txt", "out/new.txt", "s.txt"] {
            assert!(matches!(w.resolve(&ws, p), Err(ConfineError::Outside { .. })), "{p}");
        }
        // A dangling symlink (its target would be created outside) is refused.
        std::os::unix::fs::symlink(outside.join("nothing.txt"), ws.join("dangling")).unwrap();
        assert!(matches!(w.resolve(&ws, "dangling"), Err(ConfineError::DanglingSymlink { .. })));
        assert!(matches!(w.resolve(&ws, "missing/../../x"), Err(ConfineError::DotDotInMissing { .. })));
        assert_eq!(w.resolve(&ws, ""), Err(ConfineError::Empty));
    }

    #[test]
    fn an_added_root_allows_its_paths() {
        let (_d, ws, outside) = setup();
        let w = Workspace::new(vec![outside.clone()]);
        let canon = outside.canonicalize().unwrap();
        assert_eq!(w.resolve(&ws, "../outside/secret.txt").unwrap(), canon.join("secret.txt"));
        std::os::unix::fs::symlink(&outside, ws.join("out")).unwrap();
        assert_eq!(w.resolve(&ws, "out/secret.txt").unwrap(), canon.join("secret.txt"));
        assert!(matches!(w.resolve(&ws, "/etc/passwd"), Err(ConfineError::Outside { .. })));
    }
}
