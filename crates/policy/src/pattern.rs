//! Matcher patterns: globs per matcher kind, their specificity (literal characters), the
//! normalisation of the facts they are matched against, and a conservative overlap test (for
//! conflict detection).

use globset::{Glob, GlobBuilder, GlobMatcher};

/// The matcher kinds of a rule. `paths` is one kind with two lists (read, write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Tools = 0,
    Commands = 1,
    Paths = 2,
    Hosts = 3,
    TaskTypes = 4,
    Agents = 5,
}

pub(crate) const KINDS: usize = 6;

impl Kind {
    pub(crate) const ALL: [Kind; KINDS] =
        [Kind::Tools, Kind::Commands, Kind::Paths, Kind::Hosts, Kind::TaskTypes, Kind::Agents];

    /// What the pattern is matched against, in words.
    pub(crate) fn noun(self) -> &'static str {
        match self {
            Kind::Tools => "tool",
            Kind::Commands => "command",
            Kind::Paths => "path",
            Kind::Hosts => "host",
            Kind::TaskTypes => "task type",
            Kind::Agents => "agent",
        }
    }

    /// Kinds whose facts exist only for a tool call.
    pub(crate) fn is_tool_level(self) -> bool {
        matches!(self, Kind::Tools | Kind::Commands | Kind::Paths | Kind::Hosts)
    }

    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// One compiled pattern of a rule.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    /// As written.
    pub(crate) text: String,
    /// Characters outside wildcards: the pattern's contribution to a rule's specificity.
    pub(crate) literal: u32,
    /// The globs it stands for (an exact command also as `TEXT *`, an exact path also as
    /// `TEXT/**`), built with the kind's options.
    pub(crate) globs: Vec<Glob>,
    /// The same, for the overlap test.
    parts: Vec<GlobPart>,
}

impl Pattern {
    /// Compiles `text` as a pattern of `kind`; the error is globset's message.
    pub(crate) fn new(kind: Kind, text: &str) -> Result<Self, String> {
        let exact = !has_wildcard(text);
        let base = match kind {
            Kind::Commands => normalize_command(text),
            Kind::Paths => {
                let p = normalize_path(text);
                if exact { p } else { p.strip_prefix("./").map(str::to_owned).unwrap_or(p) }
            }
            Kind::Hosts => text.trim().trim_end_matches('.').to_ascii_lowercase(),
            _ => text.to_owned(),
        };
        if base.is_empty() {
            return Err("the pattern is empty".to_owned());
        }
        // Each glob with, for a glob that is a plain literal, that literal.
        let texts: Vec<(String, Option<String>)> = match (kind, exact) {
            (Kind::Commands, true) => {
                let e = globset::escape(&base);
                vec![(e.clone(), Some(base.clone())), (format!("{e} *"), None)]
            }
            (Kind::Paths, true) => {
                let trimmed = base.trim_end_matches('/');
                let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
                let e = globset::escape(trimmed);
                let under = if e.ends_with('/') { format!("{e}**") } else { format!("{e}/**") };
                vec![(e, Some(trimmed.to_owned())), (under, None)]
            }
            (_, true) => vec![(globset::escape(&base), Some(base.clone()))],
            (_, false) => vec![(base, None)],
        };
        let nocase = kind == Kind::Hosts;
        let mut globs = Vec::with_capacity(texts.len());
        let mut parts = Vec::with_capacity(texts.len());
        for (t, plain) in texts {
            let glob = GlobBuilder::new(&t)
                .literal_separator(kind == Kind::Paths)
                .case_insensitive(nocase)
                .build()
                .map_err(|e| e.kind().to_string())?;
            parts.push(GlobPart {
                text: if nocase { t.to_ascii_lowercase() } else { t },
                matcher: glob.compile_matcher(),
                plain,
            });
            globs.push(glob);
        }
        let literal = u32::try_from(literal_len(text)).unwrap_or(u32::MAX);
        Ok(Self { text: text.to_owned(), literal, globs, parts })
    }

    /// Whether some value could match both patterns (of the same kind). Conservative: when in
    /// doubt, yes.
    pub(crate) fn may_overlap(&self, other: &Pattern) -> bool {
        self.parts.iter().any(|a| other.parts.iter().any(|b| a.may_overlap(b)))
    }
}

/// One glob of a pattern, for the overlap test.
#[derive(Debug, Clone)]
struct GlobPart {
    /// The glob (lower case when case-insensitive).
    text: String,
    matcher: GlobMatcher,
    /// The value it matches when it is a plain literal.
    plain: Option<String>,
}

impl GlobPart {
    fn may_overlap(&self, other: &GlobPart) -> bool {
        if self.text == other.text {
            return true;
        }
        match (&self.plain, &other.plain) {
            (Some(a), _) => other.matcher.is_match(a),
            (None, Some(b)) => self.matcher.is_match(b),
            (None, None) => {
                // Both have wildcards: they may overlap when their literal prefixes and their
                // literal suffixes are compatible (one a prefix / suffix of the other).
                let prefix = |g: &str| g.find(['*', '?', '[', '{']).map_or_else(|| g.to_owned(), |i| g[..i].to_owned());
                let suffix =
                    |g: &str| g.rfind(['*', '?', ']', '}']).map_or_else(|| g.to_owned(), |i| g[i + 1..].to_owned());
                let (pa, pb) = (prefix(&self.text), prefix(&other.text));
                let (sa, sb) = (suffix(&self.text), suffix(&other.text));
                (pa.starts_with(&pb) || pb.starts_with(&pa)) && (sa.ends_with(&sb) || sb.ends_with(&sa))
            }
        }
    }
}

pub(crate) use descartes_core::glob::{
    command_parts, has_wildcard, is_simple_command, literal_len, normalize_command, normalize_host, normalize_path,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kind: Kind, s: &str) -> Pattern {
        Pattern::new(kind, s).unwrap()
    }

    #[test]
    fn literal_length_ignores_wildcards() {
        assert_eq!(literal_len("rm -rf *"), 7);
        assert_eq!(literal_len("/etc/**"), 5);
        assert_eq!(literal_len("a[bc]d{e,f}?"), 2);
        assert_eq!(literal_len(r"a\*"), 2);
    }

    #[test]
    fn paths_and_hosts_are_normalised() {
        assert_eq!(normalize_path("./a//b/../c/"), "a/c");
        assert_eq!(normalize_path("/../etc/./passwd"), "/etc/passwd");
        assert_eq!(normalize_path("../x"), "../x");
        assert_eq!(normalize_path(""), ".");
        assert_eq!(normalize_host("https://user@API.Example.com:443/x?y").as_deref(), Some("api.example.com"));
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("::1"));
        assert_eq!(normalize_host("example.com.").as_deref(), Some("example.com"));
        assert_eq!(normalize_host("https:///x"), None);
    }

    #[test]
    fn commands_split_on_operators() {
        let parts: Vec<String> = command_parts("echo  hi && rm -rf / ; $(curl x)").collect();
        assert_eq!(parts, ["echo hi", "rm -rf /", "curl x"]);
        assert!(is_simple_command("git status -s"));
        assert!(!is_simple_command("git status | head"));
    }

    #[test]
    fn overlap_is_conservative() {
        let yes = |k, a, b| assert!(p(k, a).may_overlap(&p(k, b)), "{a} {b}");
        let no = |k, a, b| assert!(!p(k, a).may_overlap(&p(k, b)), "{a} {b}");
        yes(Kind::Commands, "rm -rf *", "rm -rf *");
        yes(Kind::Commands, "rm *", "rm -rf /");
        yes(Kind::Commands, "git push", "git push *");
        yes(Kind::Commands, "git push", "git push --force");
        no(Kind::Commands, "git push", "git pull");
        no(Kind::Commands, "git *", "cargo *");
        yes(Kind::Paths, "src/**", "src/main.rs");
        yes(Kind::Paths, "src", "src/**/*.rs");
        no(Kind::Paths, "src/**", "docs/**");
        no(Kind::Paths, "**/*.rs", "**/*.md");
        yes(Kind::Hosts, "*.Example.com", "api.example.com");
        no(Kind::Hosts, "*.example.com", "*.example.org");
        yes(Kind::Tools, "shell", "sh*");
        no(Kind::Tools, "shell", "write_file");
        yes(Kind::Tools, "mcp__*", "*");
    }

    #[test]
    fn exact_patterns_match_prefixes_and_subtrees() {
        let set = |pat: &Pattern| {
            let mut b = globset::GlobSetBuilder::new();
            for g in &pat.globs {
                b.add(g.clone());
            }
            b.build().unwrap()
        };
        let git_push = set(&p(Kind::Commands, "git  push"));
        assert!(git_push.is_match("git push"));
        assert!(git_push.is_match("git push origin main"));
        assert!(!git_push.is_match("git pushx"));
        let secrets = set(&p(Kind::Paths, "./secrets/"));
        assert!(secrets.is_match("secrets"));
        assert!(secrets.is_match("secrets/a/b.key"));
        assert!(!secrets.is_match("secretsx"));
        let one_level = set(&p(Kind::Paths, "src/*.rs"));
        assert!(one_level.is_match("src/main.rs"));
        assert!(!one_level.is_match("src/a/main.rs"));
        let rm = set(&p(Kind::Commands, "rm -rf *"));
        assert!(rm.is_match("rm -rf /tmp/x"));
    }
}
