//! `descartes serve`: the HTTP API (`descartes-server`) over this place's event log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use descartes_app::service::Service;
use descartes_runtime::Runtime;
use descartes_runtime::serve::{SERVER_TOKEN_FILE, run_status, server_token};
use descartes_server::{ApiState, serve};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Where to listen (HOST:PORT; port 0 picks a free one). Anything but loopback needs
    /// --token-file.
    #[arg(long, default_value = "127.0.0.1:7878", value_name = "ADDR")]
    pub listen: String,
    /// The file holding the bearer token (made, mode 0600, when missing). Default:
    /// `server.token` in the state directory.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Print the token and exit.
    #[arg(long)]
    pub print_token: bool,
}

pub async fn run(rt: Runtime, args: ServeArgs) -> Result<u8> {
    if args.print_token {
        let (token, _) = token(&rt, args.token_file.as_deref())?;
        println!("{token}");
        return Ok(0);
    }
    let api = Api::open(&Arc::new(rt), &args.listen, args.token_file.as_deref()).await?;
    println!("listening on http://{}", api.bound);
    api.serve(stop_signal()).await?;
    eprintln!("descartes: the server stopped");
    Ok(0)
}

/// The token and its file (`--token-file`, or `server.token` in the state directory).
fn token(rt: &Runtime, file: Option<&std::path::Path>) -> Result<(String, PathBuf)> {
    let path = file.map_or_else(|| rt.places.state_dir.join(SERVER_TOKEN_FILE), std::path::Path::to_owned);
    let token = server_token(&path)
        .map_err(|e| descartes_app::fail(descartes_app::Problem::Config, format!("the server token: {e}")))?;
    Ok((token, path))
}

/// The API, bound and ready to serve (for `serve` and `daemon start --listen`).
pub struct Api {
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: tokio::sync::watch::Sender<bool>,
    service: Arc<Service>,
    pub bound: SocketAddr,
}

impl Api {
    /// Binds `listen` (loopback, or anywhere with an explicit token file) over the place's log.
    pub async fn open(rt: &Arc<Runtime>, listen: &str, token_file: Option<&std::path::Path>) -> Result<Self> {
        let (token, token_path) = token(rt, token_file)?;
        let addr: SocketAddr = listen.parse().map_err(|e| {
            descartes_app::fail(
                descartes_app::Problem::Usage,
                format!("--listen {listen}: {e} (write HOST:PORT, e.g. 127.0.0.1:7878)"),
            )
        })?;
        if !addr.ip().is_loopback() && token_file.is_none() {
            return Err(descartes_app::fail(
                descartes_app::Problem::Usage,
                format!(
                    "listening on {addr} exposes the API beyond this machine: pass --token-file PATH (a token \
                     you manage) to do so, or listen on 127.0.0.1"
                ),
            ));
        }
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            descartes_app::fail(descartes_app::Problem::Config, format!("cannot listen on {addr}: {e}"))
        })?;
        let bound = listener.local_addr()?;
        let stores = rt.open_stores().await?;
        let locks = rt.places.locks_dir();
        let status = Arc::new(move |s: &descartes_core::RunSummary| run_status(&locks, s));
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let mut state = ApiState::new(stores.events.clone(), token, bound, status, rx);
        // The runs this server drives stream their output to the WebSocket subscribers.
        let live = state.clone();
        let publish: descartes_app::service::Publish = Arc::new(move |v: serde_json::Value| {
            let run = v["run_id"].as_str().unwrap_or_default().to_owned();
            live.publish_delta(&run, v);
        });
        let service = Service::new(rt.clone(), stores, publish);
        state.service = Some(service.clone());
        eprintln!("descartes: serving the API on http://{bound} (token in {})", token_path.display());
        Ok(Self { listener, state, shutdown, service, bound })
    }

    /// Serves until `stop` resolves; then in-flight requests finish, streams end, and the runs
    /// this server drives are stopped (each records it and stays resumable).
    pub async fn serve(self, stop: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let served = serve(self.listener, self.state, self.shutdown, stop).await;
        self.service.shutdown(std::time::Duration::from_secs(10)).await;
        served
    }
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
}
