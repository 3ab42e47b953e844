//! Where Descartes keeps its state: a project's `.descartes/` (found by walking up from the
//! working directory, like git) or, elsewhere, `$DESCARTES_HOME` / the platform data directory.

use std::path::{Path, PathBuf};

/// The name of a project's state directory.
pub const PROJECT_DIR: &str = ".descartes";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Inside a project made by `descartes init`.
    Project { root: PathBuf },
    /// Anywhere else.
    Direct,
}

/// Every path Descartes uses.
#[derive(Debug, Clone)]
pub struct Places {
    pub mode: Mode,
    /// Holds the database, run locks and tool spools.
    pub state_dir: PathBuf,
    pub db_path: PathBuf,
    /// The user config file (may not exist).
    pub user_config: Option<PathBuf>,
    /// Local model files, shared by every project: `$DESCARTES_MODEL_DIR`, else
    /// `$DESCARTES_HOME/models`, else the platform data directory's `models`.
    pub models_dir: PathBuf,
    /// The project config file (project mode).
    pub project_config: Option<PathBuf>,
}

impl Places {
    /// Finds the places for a command run in `cwd`. `env` reads environment variables.
    pub fn discover(cwd: &Path, env: &dyn Fn(&str) -> Option<String>) -> Self {
        let home = env("DESCARTES_HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
        let dirs = directories::ProjectDirs::from("", "", "descartes");
        let user_config = match (&home, &dirs) {
            (Some(h), _) => Some(h.join("config.toml")),
            (None, Some(d)) => Some(d.config_dir().join("config.toml")),
            (None, None) => None,
        };
        let data_dir = home.clone().or_else(|| dirs.as_ref().map(|d| d.data_dir().to_owned()));
        let models_dir = env("DESCARTES_MODEL_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| data_dir.as_ref().map(|d| d.join("models")))
            .unwrap_or_else(|| cwd.join(PROJECT_DIR).join("models"));
        if let Some(root) = find_project(cwd) {
            let state_dir = root.join(PROJECT_DIR);
            return Self {
                mode: Mode::Project { root },
                db_path: state_dir.join("descartes.db"),
                project_config: Some(state_dir.join("config.toml")),
                state_dir,
                user_config,
                models_dir,
            };
        }
        let state_dir = data_dir.unwrap_or_else(|| cwd.join(PROJECT_DIR));
        Self {
            mode: Mode::Direct,
            db_path: state_dir.join("descartes.db"),
            state_dir,
            user_config,
            project_config: None,
            models_dir,
        }
    }

    /// The places `descartes init` makes in `dir`.
    pub fn project_in(dir: &Path, user_config: Option<PathBuf>) -> Self {
        let state_dir = dir.join(PROJECT_DIR);
        Self {
            mode: Mode::Project { root: dir.to_owned() },
            db_path: state_dir.join("descartes.db"),
            project_config: Some(state_dir.join("config.toml")),
            models_dir: state_dir.join("models"),
            state_dir,
            user_config,
        }
    }

    pub fn locks_dir(&self) -> PathBuf {
        self.state_dir.join("runs")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }
}

/// A `.descartes` that is not a directory, nearer to `start` than the project found (if any):
/// the user probably meant a project there, so commands say why they do not use it.
pub fn stray_state_file(start: &Path) -> Option<PathBuf> {
    for dir in start.ancestors() {
        let candidate = dir.join(PROJECT_DIR);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_dir() => return None,
            Ok(_) => return Some(candidate),
            Err(_) => {}
        }
    }
    None
}

/// The nearest ancestor of `start` (itself included) that holds a `.descartes` directory.
pub fn find_project(start: &Path) -> Option<PathBuf> {
    start.ancestors().find(|dir| dir.join(PROJECT_DIR).is_dir()).map(Path::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_is_found_by_walking_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".descartes")).unwrap();
        let deep = dir.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        let p = Places::discover(&deep, &|_| None);
        assert_eq!(p.mode, Mode::Project { root: dir.path().to_owned() });
        assert_eq!(p.db_path, dir.path().join(".descartes/descartes.db"));
    }

    #[test]
    fn a_file_named_like_the_state_directory_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".descartes")).unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        assert_eq!(stray_state_file(&sub), None);
        std::fs::write(sub.join(".descartes"), "").unwrap();
        assert_eq!(stray_state_file(&sub), Some(sub.join(".descartes")));
    }

    #[test]
    fn direct_mode_uses_descartes_home() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let h = home.display().to_string();
        let p = Places::discover(dir.path(), &|k| (k == "DESCARTES_HOME").then(|| h.clone()));
        assert_eq!(p.mode, Mode::Direct);
        assert_eq!(p.db_path, home.join("descartes.db"));
        assert_eq!(p.user_config, Some(home.join("config.toml")));
    }
}
