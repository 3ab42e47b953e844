//! Tool names as models see them: `mcp__<server>__<tool>`, in the charset every provider
//! accepts (`[a-zA-Z0-9_-]`, at most 64 characters).

/// The most characters of a tool name (OpenAI's and Anthropic's limit).
pub const MAX_NAME: usize = 64;

/// Replaces every character outside `[a-zA-Z0-9_-]` with `_`.
pub fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

/// `mcp__<server>__<tool>`, sanitised; a name that was changed by sanitising or is longer than
/// 64 characters gets a short hash of the original, so two tools never share a name.
pub fn model_tool_name(server: &str, tool: &str) -> String {
    let raw = format!("mcp__{server}__{tool}");
    let clean = format!("mcp__{}__{}", sanitize(server), sanitize(tool));
    if clean == raw && clean.len() <= MAX_NAME {
        return clean;
    }
    let hash = format!("{:08x}", fnv1a(raw.as_bytes()) as u32);
    let head: String = clean.chars().take(MAX_NAME - hash.len() - 1).collect();
    format!("{head}_{hash}")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(n: &str) -> bool {
        n.len() <= MAX_NAME && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }

    #[test]
    fn plain_names_are_kept() {
        assert_eq!(model_tool_name("everything", "echo"), "mcp__everything__echo");
        assert_eq!(model_tool_name("fs", "read-file"), "mcp__fs__read-file");
    }

    #[test]
    fn odd_and_long_names_are_valid_and_distinct() {
        let a = model_tool_name("my server", "a.b");
        let b = model_tool_name("my_server", "a_b");
        assert!(valid(&a) && valid(&b), "{a} {b}");
        assert_ne!(a, b);
        let long = "x".repeat(100);
        let l1 = model_tool_name("s", &format!("{long}1"));
        let l2 = model_tool_name("s", &format!("{long}2"));
        assert!(valid(&l1) && valid(&l2), "{l1}");
        assert_eq!(l1.len(), MAX_NAME);
        assert_ne!(l1, l2);
        let unicode = model_tool_name("sérveur", "outil✓");
        assert!(valid(&unicode), "{unicode}");
    }
}
