//! The daemon's files under the state directory and its local control socket.
//!
//! - `daemon.pid`: the daemon's pid, and an exclusive `flock` the daemon holds for its whole
//!   life. The OS drops the lock when the process dies (even by SIGKILL), so "running" means
//!   "someone holds the lock", and a pid file whose lock nobody holds is stale.
//! - `daemon.sock`: a Unix socket (mode 0600: only the user can connect) speaking JSON lines:
//!   `{"cmd":"status"}` → a [`DaemonStatus`](super::DaemonStatus); `{"cmd":"stop"}` →
//!   `{"ok":true}` and a graceful stop; `{"cmd":"wake"}` → `{"ok":true}` and idle workers look
//!   for work at once. Clients authenticate: the peer must run as the daemon's user (checked
//!   with `SO_PEERCRED`) and every request carries `"token"`, the content of `daemon.token`.
//! - `daemon.token`: a random token (mode 0600), made anew when the daemon starts. Sandboxed
//!   commands cannot use it: they may not open Unix sockets, and the file is hidden from them
//!   (a protected path).
//! - `daemon.log`: the daemon's log.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use super::{DaemonError, DaemonHandle};

/// The name of the control socket's token file, beside the socket.
pub const TOKEN_FILE: &str = "daemon.token";

/// A bound control socket and the token its clients must send.
#[derive(Debug)]
pub struct ControlSocket {
    pub listener: UnixListener,
    token: String,
}

/// A fresh random token (32 hex digits from the kernel's generator).
fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Equality that takes as long whatever the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where a daemon's files are.
#[derive(Debug, Clone)]
pub struct DaemonPaths {
    pub pid: PathBuf,
    pub socket: PathBuf,
    pub token: PathBuf,
    pub log: PathBuf,
}

impl DaemonPaths {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            pid: state_dir.join("daemon.pid"),
            socket: state_dir.join("daemon.sock"),
            token: state_dir.join(TOKEN_FILE),
            log: state_dir.join("daemon.log"),
        }
    }

    /// The pid of the running daemon, if one holds the pid file's lock.
    pub fn running_pid(&self) -> Option<u32> {
        let file = File::open(&self.pid).ok()?;
        match file.try_lock_shared() {
            Err(TryLockError::WouldBlock) => {
                // The daemon writes its pid right after locking; give it a moment.
                for _ in 0..50 {
                    if let Some(pid) = std::fs::read_to_string(&self.pid).ok().and_then(|s| s.trim().parse().ok()) {
                        return Some(pid);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Some(0)
            }
            _ => None,
        }
    }

    /// Removes a pid file and socket left by a daemon that is gone. Returns whether there was
    /// anything to clean.
    pub fn clean_stale(&self) -> bool {
        if !self.pid.exists() && !self.socket.exists() {
            return false;
        }
        match PidLock::acquire(&self.pid) {
            Ok(lock) => {
                let _ = std::fs::remove_file(&self.socket);
                let _ = std::fs::remove_file(&self.token);
                lock.release();
                true
            }
            Err(_) => false,
        }
    }
}

/// The held `daemon.pid` lock; proof that this process is the daemon of its state directory.
#[derive(Debug)]
pub struct PidLock {
    file: File,
    path: PathBuf,
}

impl PidLock {
    /// Takes the lock and writes our pid, or says which daemon runs.
    pub fn acquire(path: &Path) -> Result<Self, DaemonError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A releasing daemon removes the file after we opened it: then our lock is on a file
        // nobody else sees, so check that the path still names the file we locked.
        for _ in 0..100 {
            let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let pid = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
                    return Err(DaemonError::AlreadyRunning { pid });
                }
                Err(TryLockError::Error(e)) => return Err(e.into()),
            }
            let same = match (file.metadata(), std::fs::metadata(path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            file.set_len(0)?;
            write!(file, "{}", std::process::id())?;
            file.flush()?;
            return Ok(Self { file, path: path.to_owned() });
        }
        Err(DaemonError::Io(std::io::Error::other(format!("cannot lock {}: it keeps being replaced", path.display()))))
    }

    /// Removes the pid file, then releases the lock (as dropping it does).
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// Binds the control socket with mode 0600 (bound in a private directory, then moved into
/// place, so nobody else can connect in between). Call it while holding the [`PidLock`]: an
/// existing socket file is stale and replaced.
pub fn bind_control(path: &Path) -> Result<ControlSocket, DaemonError> {
    // sockaddr_un holds 108 bytes with the trailing NUL.
    if path.as_os_str().len() > 100 {
        return Err(DaemonError::SocketPath(path.to_owned()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let private = dir.join(format!(".daemon.sock.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::create_dir(&private)?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
    let tmp = private.join("s");
    let bound = (|| -> Result<ControlSocket, DaemonError> {
        // The token first, made in the private directory too and moved into place.
        let token = new_token()?;
        let token_tmp = private.join("t");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&token_tmp)?;
            f.write_all(token.as_bytes())?;
        }
        std::fs::rename(&token_tmp, dir.join(TOKEN_FILE))?;
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        let _ = std::fs::remove_file(path);
        std::fs::rename(&tmp, path)?;
        Ok(ControlSocket { listener, token })
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Answers control requests until the daemon has stopped.
pub async fn serve_control(control: ControlSocket, handle: DaemonHandle) {
    let ControlSocket { listener, token } = control;
    let token = std::sync::Arc::new(token);
    let uid = nix::unistd::geteuid().as_raw();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = handle.stopped() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let handle = handle.clone();
                let token = token.clone();
                let peer = stream.peer_cred().map(|c| c.uid());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = tokio::io::BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let reply = match peer {
                            Ok(peer) if peer == uid => answer(&handle, &token, &line),
                            Ok(peer) => {
                                tracing::warn!(peer, "control socket: a client of another user was refused");
                                json!({ "error": "unauthenticated: the client runs as another user" })
                            }
                            Err(_) => json!({ "error": "unauthenticated: the client's credentials are unknown" }),
                        };
                        let mut reply = reply.to_string();
                        reply.push('\n');
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn answer(handle: &DaemonHandle, token: &str, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({ "error": format!("not a JSON request: {e}; send {{\"cmd\":\"status\"}}") }),
    };
    if !req.get("token").and_then(Value::as_str).is_some_and(|t| same_secret(t, token)) {
        tracing::warn!("control socket: a request without the daemon's token was refused");
        return json!({ "error": format!("unauthenticated: send \"token\", the content of {TOKEN_FILE}") });
    }
    match req.get("cmd").and_then(Value::as_str) {
        Some("status") => serde_json::to_value(handle.status()).unwrap_or_else(|e| json!({ "error": e.to_string() })),
        Some("stop") => {
            tracing::info!("stop requested through the control socket");
            handle.stop();
            json!({ "ok": true })
        }
        Some("wake") => {
            handle.wake();
            json!({ "ok": true })
        }
        other => json!({ "error": format!("unknown command {other:?}; known: status, stop, wake") }),
    }
}

/// `req` with the token of the daemon whose socket is `socket` (read from the token file beside
/// it; without one, the request goes as it is and the daemon refuses it).
fn with_token(socket: &Path, req: &Value) -> Value {
    let mut req = req.clone();
    if let (Some(obj), Ok(token)) = (req.as_object_mut(), std::fs::read_to_string(socket.with_file_name(TOKEN_FILE))) {
        obj.insert("token".into(), Value::String(token.trim().to_owned()));
    }
    req
}

/// Sends one request to a daemon's control socket and returns its answer (blocking).
pub fn request(socket: &Path, req: &Value, timeout: Duration) -> std::io::Result<Value> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = with_token(socket, req).to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    let value: Value = serde_json::from_str(&reply).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad answer from the daemon: {e}"))
    })?;
    if let Some(err) = value.get("error").and_then(Value::as_str) {
        return Err(std::io::Error::other(format!("the daemon refused the request: {err}")));
    }
    Ok(value)
}

/// Asks idle workers of the daemon of `state_dir`, if one runs, to look for work now (so a
/// new task starts without waiting for the next poll). Never blocks for long; errors ignored.
pub fn poke(state_dir: &Path) {
    let socket = DaemonPaths::new(state_dir).socket;
    // Fire and forget: the answer is not awaited.
    if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&socket) {
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let mut line = with_token(&socket, &json!({ "cmd": "wake" })).to_string();
        line.push('\n');
        let _ = stream.write_all(line.as_bytes());
    }
}

/// Sends SIGTERM to a process (a graceful stop when the control socket does not answer).
pub fn terminate(pid: u32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::other("bad pid"))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
        .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_lock_is_exclusive_and_stale_files_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let paths = DaemonPaths::new(dir.path());
        assert_eq!(paths.running_pid(), None);
        let lock = PidLock::acquire(&paths.pid).unwrap();
        assert_eq!(paths.running_pid(), Some(std::process::id()));
        match PidLock::acquire(&paths.pid) {
            Err(DaemonError::AlreadyRunning { pid }) => assert_eq!(pid, std::process::id()),
            other => panic!("{other:?}"),
        }
        assert!(!paths.clean_stale());
        lock.release();
        assert!(!paths.pid.exists());
        // A pid file left by a dead process.
        std::fs::write(&paths.pid, "999999").unwrap();
        std::fs::write(&paths.socket, "").unwrap();
        assert_eq!(paths.running_pid(), None);
        assert!(paths.clean_stale());
        assert!(!paths.pid.exists() && !paths.socket.exists());
    }

    #[tokio::test]
    async fn socket_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let paths = DaemonPaths::new(dir.path());
        let control = bind_control(&paths.socket).unwrap();
        for f in [&paths.socket, &paths.token] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        assert_eq!(std::fs::read_to_string(&paths.token).unwrap(), control.token);
        assert_eq!(control.token.len(), 32);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary directory is left");
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
    }
}
