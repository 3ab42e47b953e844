//! The glob and command conventions both rule languages share (`[permissions]` in
//! [`crate::policy`], the YAML policies of `descartes-policy`): what counts as a wildcard, a
//! pattern's specificity (its literal characters), how a shell command is split into the parts
//! a deny pattern is matched against, and how paths and hosts are normalised before matching.

pub fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Characters outside wildcards (`*`, `?`, `[...]`, `{...}`); an escaped character counts once.
pub fn literal_len(s: &str) -> usize {
    let mut n = 0;
    let mut in_class = false;
    let mut depth_alt = 0usize;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if !in_class && depth_alt == 0 => {
                if chars.next().is_some() {
                    n += 1;
                }
            }
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            '{' if !in_class => depth_alt += 1,
            '}' if !in_class && depth_alt > 0 => depth_alt -= 1,
            '*' | '?' if !in_class && depth_alt == 0 => {}
            _ if in_class || depth_alt > 0 => {}
            _ => n += 1,
        }
    }
    n
}

/// Whitespace runs made single spaces, ends trimmed.
pub fn normalize_command(command: &str) -> String {
    let mut out = String::with_capacity(command.len());
    for word in command.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

const SHELL_OPERATORS: &[char] = &[';', '&', '|', '<', '>', '`', '\n', '\r', '(', ')'];

/// A command with no chaining, piping, redirection or substitution.
pub fn is_simple_command(command: &str) -> bool {
    !command.contains(SHELL_OPERATORS) && !command.contains("$(")
}

/// The parts of a command between shell operators, normalised.
pub fn command_parts(command: &str) -> impl Iterator<Item = String> + '_ {
    command
        .split(SHELL_OPERATORS)
        .map(|p| normalize_command(p.trim().trim_start_matches('$')))
        .filter(|p| !p.is_empty())
}

/// A path with `.`, `..` and repeated or trailing `/` resolved lexically; `.` for an empty
/// relative path.
pub fn normalize_path(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                // `/..` is `/`.
                _ if absolute => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// The host of a host name or URL: lower case, without scheme, user info, port, path or a
/// trailing dot. `None` when there is none.
pub fn normalize_host(s: &str) -> Option<String> {
    let s = s.trim();
    let rest = s.split_once("://").map_or(s, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host =
        if let Some(v6) = host_port.strip_prefix('[') { v6.split(']').next()? } else { host_port.split(':').next()? };
    let host = host.trim_end_matches('.');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}
