//! What `descartes serve` needs from the runtime: its token (a file in the state directory,
//! mode 0600, made on first start) and the status of a run as the run locks tell it.

use std::io::Write;
use std::path::Path;

use descartes_core::RunSummary;

use crate::RunLock;

/// The server's token file in the state directory.
pub const SERVER_TOKEN_FILE: &str = "server.token";

/// The token in `path`, made (32 hex digits from the kernel's generator, mode 0600) when the
/// file does not exist. An empty or unreadable file is an error, not replaced.
pub fn server_token(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            if token.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{} is empty: write a token in it or remove it",
                    path.display()
                )));
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Read;
            use std::os::unix::fs::OpenOptionsExt;
            let mut bytes = [0u8; 16];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            f.write_all(token.as_bytes())?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

/// A run's status: the log's, except that a `running` run whose lock nobody holds is
/// `interrupted` (its process is gone).
pub fn run_status(locks_dir: &Path, summary: &RunSummary) -> String {
    if summary.status == "running" && !RunLock::is_held(locks_dir, summary.run_id.as_str()) {
        "interrupted".to_owned()
    } else {
        summary.status.clone()
    }
}
