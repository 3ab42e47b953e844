//! The environment given to commands Descartes starts (`shell`, task commands, the sandbox
//! helper): built by a policy, like Codex's `shell_environment_policy`, so that API keys and
//! other secrets of Descartes' own environment never reach a command (and through its output,
//! the log and the model).
//!
//! `[shell] env = "inherit" | "core" | "none"` chooses the starting set (everything, the
//! [`CORE_VARS`], nothing); then every variable matching a default exclude
//! ([`DEFAULT_EXCLUDES`]: `*KEY*`, `*SECRET*`, `*TOKEN*`, `*PASSWORD*`, ..., and the provider
//! variables given by the runtime) or an `exclude` glob is removed, unless it matches an
//! `include` glob; finally `set` adds fixed values. Globs are case-insensitive.

use std::collections::BTreeMap;
use std::ffi::OsString;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

/// The starting set of variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvInherit {
    /// No variable.
    None,
    /// Only [`CORE_VARS`].
    Core,
    /// Every variable of Descartes' environment.
    #[default]
    Inherit,
}

/// The variables of `core`.
pub const CORE_VARS: &[&str] =
    &["HOME", "LOGNAME", "PATH", "SHELL", "USER", "USERNAME", "TMPDIR", "TEMP", "TMP", "LANG", "LC_*", "TERM", "TZ"];

/// Removed unless included again.
pub const DEFAULT_EXCLUDES: &[&str] =
    &["*KEY*", "*SECRET*", "*TOKEN*", "*PASSWORD*", "*PASSWD*", "*CREDENTIAL*", "*AUTH*", "DESCARTES_DATABASE_URL"];

/// `[shell]` in config.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnvPolicy {
    /// The starting set: `inherit` (default), `core` or `none`.
    pub env: EnvInherit,
    /// More globs of variables to remove.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Globs of variables kept even when an exclude matches (e.g. `GITHUB_TOKEN`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Variables set to fixed values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
}

/// An [`EnvPolicy`] compiled, with the provider variables the runtime adds to the excludes.
#[derive(Debug, Clone)]
pub struct ShellEnv {
    inherit: EnvInherit,
    core: GlobSet,
    exclude: GlobSet,
    include: GlobSet,
    set: BTreeMap<String, String>,
}

impl Default for ShellEnv {
    fn default() -> Self {
        // The defaults are valid globs.
        Self::new(&EnvPolicy::default(), &[]).unwrap_or_else(|_| Self {
            inherit: EnvInherit::None,
            core: GlobSet::empty(),
            exclude: GlobSet::empty(),
            include: GlobSet::empty(),
            set: BTreeMap::new(),
        })
    }
}

fn globs<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = GlobBuilder::new(p)
            .case_insensitive(true)
            .build()
            .map_err(|e| format!("bad environment variable glob `{p}`: {e}"))?;
        b.add(g);
    }
    b.build().map_err(|e| e.to_string())
}

impl ShellEnv {
    /// Compiles `policy`; `secret_vars` (the provider key and URL variables) are excluded too.
    pub fn new(policy: &EnvPolicy, secret_vars: &[String]) -> Result<Self, String> {
        Ok(Self {
            inherit: policy.env,
            core: globs(CORE_VARS.iter().copied())?,
            exclude: globs(
                DEFAULT_EXCLUDES
                    .iter()
                    .copied()
                    .chain(policy.exclude.iter().map(String::as_str))
                    .chain(secret_vars.iter().map(String::as_str)),
            )?,
            include: globs(policy.include.iter().map(String::as_str))?,
            set: policy.set.clone(),
        })
    }

    /// Whether a variable of Descartes' environment is passed on.
    pub fn passes(&self, name: &str) -> bool {
        let started = match self.inherit {
            EnvInherit::None => false,
            EnvInherit::Core => self.core.is_match(name),
            EnvInherit::Inherit => true,
        };
        started && (self.include.is_match(name) || !self.exclude.is_match(name))
    }

    /// The environment built from `vars` (Descartes' own).
    pub fn build(&self, vars: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
        let mut out: Vec<(OsString, OsString)> =
            vars.into_iter().filter(|(k, _)| k.to_str().is_some_and(|k| self.passes(k))).collect();
        for (k, v) in &self.set {
            out.retain(|(name, _)| name != k.as_str());
            out.push((k.into(), v.into()));
        }
        out
    }

    /// Gives `command` exactly this environment (built from the current process's).
    pub fn apply(&self, command: &mut tokio::process::Command) {
        command.env_clear().envs(self.build(std::env::vars_os()));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        list.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect()
    }

    fn names(out: &[(OsString, OsString)]) -> Vec<&str> {
        out.iter().map(|(k, _)| k.to_str().unwrap()).collect()
    }

    #[test]
    fn secrets_are_left_out_by_default() {
        let env = ShellEnv::new(&EnvPolicy::default(), &["OPENAI_BASE_URL".into()]).unwrap();
        let out = env.build(vars(&[
            ("PATH", "/bin"),
            ("OPENAI_API_KEY", "sk-1"),
            ("anthropic_api_key", "sk-2"),
            ("GITHUB_TOKEN", "t"),
            ("DB_PASSWORD", "p"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("OPENAI_BASE_URL", "http://u:k@h"),
            ("DESCARTES_DATABASE_URL", "postgres://u:p@h/db"),
            ("LANG", "C.UTF-8"),
            ("CARGO_HOME", "/c"),
        ]));
        assert_eq!(names(&out), vec!["PATH", "LANG", "CARGO_HOME"]);
    }

    #[test]
    fn core_none_include_exclude_and_set() {
        let core = ShellEnv::new(&EnvPolicy { env: EnvInherit::Core, ..Default::default() }, &[]).unwrap();
        let out = core.build(vars(&[("PATH", "/bin"), ("LC_ALL", "C"), ("CARGO_HOME", "/c"), ("HOME", "/h")]));
        assert_eq!(names(&out), vec!["PATH", "LC_ALL", "HOME"]);
        let none = ShellEnv::new(&EnvPolicy { env: EnvInherit::None, ..Default::default() }, &[]).unwrap();
        assert!(none.build(vars(&[("PATH", "/bin")])).is_empty());
        let custom = ShellEnv::new(
            &EnvPolicy {
                env: EnvInherit::Inherit,
                exclude: vec!["AWS_*".into()],
                include: vec!["GITHUB_TOKEN".into()],
                set: [("CI".to_owned(), "1".to_owned())].into(),
            },
            &[],
        )
        .unwrap();
        let out = custom.build(vars(&[("AWS_REGION", "x"), ("GITHUB_TOKEN", "t"), ("NPM_TOKEN", "n"), ("CI", "0")]));
        assert_eq!(out, vars(&[("GITHUB_TOKEN", "t"), ("CI", "1")]));
        assert!(ShellEnv::new(&EnvPolicy { exclude: vec!["[".into()], ..Default::default() }, &[]).is_err());
    }
}
