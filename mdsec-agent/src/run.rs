//! `mdsec-agent run`: attach, poll, serve, and stop cleanly.
//!
//! Stop semantics: on SIGINT/SIGTERM with `on_exit: detach` (default) the XDP
//! program is detached and every pin removed. With `on_exit: keep` the datapath
//! stays attached and counting (pinned links and maps), and the next `run` takes it
//! over without a gap. A crash leaves the pins in place either way, so a restarted
//! agent continues the same counts; `mdsec-agent detach` removes them by hand.

use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use log::{error, info};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api::{self, AppState},
    config::{Config, OnExit},
    loader::Datapath,
    poller::Poller,
    state::Tables,
};

pub async fn run(cfg: Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("create state dir {}", cfg.state_dir.display()))?;
    // Bind before touching the datapath: a busy port should fail without side effects.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;

    let mut dp = Datapath::load(&cfg)?;
    let mut poller = Poller::new(&mut dp, cfg.flow_idle_timeout())?;
    let tables = Arc::new(RwLock::new(Tables::default()));
    poller.poll(&tables)?;
    poller.spawn(tables.clone(), cfg.poll_interval());

    let state = Arc::new(AppState {
        tables,
        attached: dp.attached.clone(),
    });
    info!("API on http://{}", cfg.listen);
    let server = tokio::spawn(async move { axum::serve(listener, api::router(state)).await });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        r = server => {
            error!("HTTP server stopped: {r:?}");
            "HTTP server failure"
        }
    };
    match cfg.on_exit {
        OnExit::Detach => {
            info!("{why}: detaching XDP and removing pins");
            dp.detach_and_unpin()?;
        }
        OnExit::Keep => info!("{why}: leaving the datapath attached (on_exit: keep)"),
    }
    Ok(())
}
