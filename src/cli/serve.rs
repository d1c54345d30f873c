//! `serve`: the long-running process, until SIGTERM or SIGINT.

use super::{init_logging, load_config, Cli};

pub async fn run(cli: &Cli) -> anyhow::Result<i32> {
    init_logging(cli, false);
    let config = load_config(cli)?;
    let options = rostersync::serve::ServeOptions {
        worker: rostersync::sync::worker::WorkerSettings::from_config(&config.server),
        ..rostersync::serve::ServeOptions::default()
    };
    rostersync::serve::serve(
        config,
        options,
        |addr| println!("listening on {addr}"),
        shutdown_signal(),
    )
    .await?;
    Ok(0)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
