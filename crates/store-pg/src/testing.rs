//! A fresh PostgreSQL database per test, for this crate's tests and anyone else's.
//!
//! The server comes from, in order:
//! 1. `DESCARTES_TEST_DATABASE_URL` (e.g. `postgres://postgres@127.0.0.1:5432/postgres`): a
//!    server the tests may create and drop databases on;
//! 2. a throwaway cluster started from the installed binaries (`initdb` and `pg_ctl` found
//!    through `DESCARTES_PG_BINDIR`, `pg_config --bindir`, `/usr/lib/postgresql/*/bin` or
//!    `PATH`; `DESCARTES_PG_BINDIR=` (empty) disables this), in a temporary directory, on a free loopback port, with `fsync=off`; as root it
//!    runs as the `postgres` user (initdb refuses root). One cluster serves a whole test binary
//!    and is stopped and removed by a watchdog once that process exits.
//!
//! When neither works, [`TestDb::create`] prints a loud warning and returns `None`, so a suite
//! still passes on a machine without PostgreSQL; set `DESCARTES_TEST_REQUIRE_POSTGRES=1` (CI) to
//! make that a failure instead.
//!
//! Every [`TestDb`] is its own database (`descartes_test_<ulid>`), dropped when the value is,
//! so tests run in parallel without seeing each other.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use descartes_core::StoreError;
use postgres::{Client, Config, NoTls};

use crate::conn::redact_url;
use crate::{PgOptions, PgStore};

/// The server to use for tests, when set.
pub const URL_VAR: &str = "DESCARTES_TEST_DATABASE_URL";
/// When set (to anything but `0`), a missing PostgreSQL fails the test instead of skipping it.
pub const REQUIRE_VAR: &str = "DESCARTES_TEST_REQUIRE_POSTGRES";
/// Where `initdb` and `pg_ctl` are, when set.
pub const BINDIR_VAR: &str = "DESCARTES_PG_BINDIR";

/// A database of its own for one test; dropped (with its connections) when this is dropped.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin: String,
}

impl TestDb {
    /// A fresh database, or `None` after a loud warning when no PostgreSQL can be had (a panic
    /// instead when `DESCARTES_TEST_REQUIRE_POSTGRES` is set).
    pub fn create() -> Option<TestDb> {
        match Self::try_create() {
            Ok(db) => Some(db),
            Err(why) => {
                if std::env::var(REQUIRE_VAR).is_ok_and(|v| !v.is_empty() && v != "0") {
                    panic!("PostgreSQL is required ({REQUIRE_VAR} is set) but none can be had: {why}");
                }
                // Straight to the process's stderr (the test harness captures `eprintln!`), once.
                static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if !WARNED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                         !! SKIPPING PostgreSQL tests: {why}\n\
                         !! Set {URL_VAR}=postgres://USER@HOST:PORT/DB or install PostgreSQL\n\
                         !! (initdb and pg_ctl) to run them.\n\
                         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
                    );
                }
                None
            }
        }
    }

    /// A fresh database, or why none can be had.
    pub fn try_create() -> Result<TestDb, String> {
        Self::try_create_with("")
    }

    /// [`TestDb::try_create`] with options for `CREATE DATABASE` (e.g. a locale).
    pub fn try_create_with(options: &str) -> Result<TestDb, String> {
        off_runtime(|| {
            let admin = admin_url()?;
            let name = format!("descartes_test_{}", descartes_protocol::RunId::generate());
            let mut client = connect(&admin)?;
            let mut tries = 0;
            loop {
                // Concurrent CREATE DATABASE may find the template busy; try again.
                match client.batch_execute(&format!("CREATE DATABASE {name} {options}")) {
                    Ok(()) => break,
                    Err(e) if tries < 20 && is_busy(&e) => {
                        tries += 1;
                        tracing::debug!(error = %e, "retrying CREATE DATABASE");
                        std::thread::sleep(Duration::from_millis(50 * tries));
                    }
                    Err(e) => return Err(format!("cannot create a test database: {e}")),
                }
            }
            let url = with_dbname(&admin, &name);
            Ok(TestDb { name, url, admin })
        })
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A store on this database, without a WAL flush per commit (`synchronous_commit = off`):
    /// the disk of the machines this runs on slows down after long series of flushes.
    pub fn store(&self) -> Result<PgStore, StoreError> {
        PgStore::connect_with(&self.url, PgOptions { synchronous_commit: false, ..PgOptions::default() })
    }

    /// A store with the given options.
    pub fn store_with(&self, options: PgOptions) -> Result<PgStore, StoreError> {
        PgStore::connect_with(&self.url, options)
    }

    /// Runs `f` with a plain client on this database (for checks below the store's API), on a
    /// plain thread (the client blocks).
    pub fn with_client<T: Send>(&self, f: impl FnOnce(&mut Client) -> T + Send) -> Result<T, String> {
        let url = self.url.clone();
        off_runtime(move || Ok(f(&mut connect(&url)?)))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = off_runtime(move || {
            let mut client = connect(&admin)?;
            client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).map_err(|e| e.to_string())
        });
    }
}

/// The template database is in use (by a concurrent `CREATE DATABASE`): worth another try.
fn is_busy(e: &postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| d.code() == &postgres::error::SqlState::OBJECT_IN_USE)
}

/// Runs blocking client work on a plain thread when called from an async runtime.
fn off_runtime<T: Send>(f: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(r) => r,
        Err(_) => Err("test database thread panicked".into()),
    })
}

fn connect(url: &str) -> Result<Client, String> {
    let mut config: Config = url.parse().map_err(|e| format!("invalid URL {}: {e}", redact_url(url)))?;
    config.connect_timeout(Duration::from_secs(5));
    config.connect(NoTls).map_err(|e| format!("cannot connect to {}: {e}", redact_url(url)))
}

/// `url` with its database replaced by `db` (URL and key-value forms).
pub fn with_dbname(url: &str, db: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let authority = before_query.split('/').next().unwrap_or_default();
        let mut out = format!("{scheme}://{authority}/{db}");
        if let Some(q) = query {
            // A `dbname=` parameter would override the path.
            let kept: Vec<&str> = q.split('&').filter(|p| !p.starts_with("dbname=")).collect();
            if !kept.is_empty() {
                out.push('?');
                out.push_str(&kept.join("&"));
            }
        }
        out
    } else {
        format!("{url} dbname={db}")
    }
}

/// The admin URL of the server tests use (resolved once per process: this may start the
/// throwaway cluster).
pub fn admin_url() -> Result<String, String> {
    off_runtime(|| {
        static ADMIN: OnceLock<Result<String, String>> = OnceLock::new();
        ADMIN.get_or_init(resolve_admin).clone()
    })
}

fn resolve_admin() -> Result<String, String> {
    let mut notes = Vec::new();
    if let Ok(url) = std::env::var(URL_VAR)
        && !url.trim().is_empty()
    {
        match connect(&url).and_then(|mut c| c.batch_execute("SELECT 1").map_err(|e| e.to_string())) {
            Ok(()) => return Ok(url),
            Err(e) => notes.push(format!("{URL_VAR} does not answer ({e})")),
        }
    }
    match start_cluster() {
        Ok(url) => Ok(url),
        Err(e) => {
            notes.push(format!("no throwaway cluster ({e})"));
            Err(notes.join("; "))
        }
    }
}

/// Children that must outlive the functions that started them (the cluster's watchdog).
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

fn start_cluster() -> Result<String, String> {
    let bindir = find_bindir().ok_or("no PostgreSQL binaries (initdb, pg_ctl) found")?;
    let as_root = effective_uid() == Some(0);
    let base = std::env::temp_dir().join(format!(
        "descartes-pg-{}-{}",
        std::process::id(),
        descartes_protocol::RunId::generate()
    ));
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    if as_root {
        run(Command::new("chown").arg("postgres:postgres").arg(&base), "chown")?;
    }
    let data = base.join("data");
    let initdb = bindir.join("initdb");
    let pg_ctl = bindir.join("pg_ctl");
    run(
        user_cmd(as_root, &initdb).arg("-D").arg(&data).args([
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
        ]),
        "initdb",
    )?;
    let mut last_err = String::new();
    for _ in 0..3 {
        let port = free_port()?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300 -c shared_buffers=64MB",
            base.display()
        );
        let started = run(
            user_cmd(as_root, &pg_ctl)
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(base.join("log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(&opts)
                .arg("start"),
            "pg_ctl start",
        );
        match started {
            Ok(()) => {
                spawn_watchdog(as_root, &pg_ctl, &data, &base);
                return Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"));
            }
            Err(e) => last_err = e,
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    Err(last_err)
}

/// Stops the cluster and removes its directory once this process is gone.
fn spawn_watchdog(as_root: bool, pg_ctl: &Path, data: &Path, base: &Path) {
    let prefix = if as_root { "runuser -u postgres -- " } else { "" };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {prefix}{pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {base}",
        pid = std::process::id(),
        pg_ctl = quote(pg_ctl),
        data = quote(data),
        base = quote(base),
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let (Ok(child), Ok(mut children)) = (child, CHILDREN.lock()) {
        children.push(child);
    }
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

fn user_cmd(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!("{what} failed ({}): {}", out.status, stderr.trim()))
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn find_bindir() -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(d) = std::env::var(BINDIR_VAR) {
        // Set: that directory or nothing (an empty or wrong value disables the cluster).
        let d = PathBuf::from(d);
        return has(&d).then_some(d);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().split('.').next()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has(d))
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return Some(d);
    }
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).find(|d| has(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(with_dbname("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
        assert_eq!(with_dbname("postgres://u:p@h", "x"), "postgres://u:p@h/x");
        assert_eq!(
            with_dbname("postgresql://u@h/db?sslmode=disable&dbname=db", "x"),
            "postgresql://u@h/x?sslmode=disable"
        );
        assert_eq!(with_dbname("host=h user=u", "x"), "host=h user=u dbname=x");
    }
}
