//! The gateway's workers: dispatch (apalis over Redis), tracking and the
//! reconciler, run together in each `gateway-worker` process.

pub mod context;
pub mod dispatch;
pub mod reconcile;
pub mod track;
pub mod wake;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apalis::prelude::{Monitor, PollWith, Strategy, WorkerBuilder, WorkerBuilderExt};
use apalis_redis::RedisStorage;
use shared::config::{Backend, Config};
use shared::limiter::{Limiter, RedisLimiter};
use shared::queue::{self, Dispatch, DispatchQueue};
use shared::secrets::SecretBox;
use shared::storage::PgStore;
use tokio::sync::{mpsc, watch};

use crate::context::WorkerCtx;

/// A name no other worker process has used: apalis-redis refuses a name
/// whose heartbeat is recent, even after a clean exit.
pub fn unique_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", ulid::Ulid::new())
}

/// Runs one worker process until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let Backend::Distributed { database_url, redis_url } = config.backend.clone() else {
        anyhow::bail!("gateway-worker needs DATABASE_URL and REDIS_URL");
    };
    let store = PgStore::connect(&database_url, 8).await.context("connecting to Postgres")?;
    wait_for_schema(&store).await;
    let conn = apalis_redis::connect(redis_url.as_str()).await.context("connecting to Redis")?;
    let prefix = config.redis_prefix.clone();
    let limiter = Limiter::Redis(RedisLimiter::new(conn.clone(), prefix.clone()));
    let queue = DispatchQueue::new(conn.clone(), &prefix, &config.worker);
    let name = unique_name();
    let secrets = SecretBox::from_config(config.secret_key.as_deref());
    let apalis_config = queue::apalis_config(&prefix, &config.worker);
    let concurrency = config.worker.concurrency;
    let (tracked_tx, tracked_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(WorkerCtx::new(name.clone(), Arc::new(config), store, limiter, queue, secrets, tracked_tx));
    tracing::info!(worker = %name, "worker started");

    let wake = wake::WakeSignal::default();
    let listener = tokio::spawn(wake::listen(redis_url.clone(), queue::available_channel(&apalis_config), wake.clone()));
    let heartbeat = ctx.config.worker.heartbeat;

    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = tokio::spawn(track::run(ctx.clone(), tracked_rx, stop_rx.clone()));
    let reconciler = tokio::spawn(reconcile::run(ctx.clone(), stop_rx));

    let handler_ctx = ctx.clone();
    let monitor = Monitor::new()
        // A Redis outage ends the apalis worker; come back with a fresh name
        // once it is reachable again.
        .should_restart(|_, err| {
            tracing::warn!(error = %err, "queue worker stopped; restarting");
            true
        })
        .register(move |restart| {
            let storage = RedisStorage::<Dispatch>::new(conn.clone()).with_config(apalis_config.clone());
            // Fetch when a push is announced, and at least every heartbeat
            // (retries come due without an announcement).
            let strategy = Strategy::new().stream(wake.clone()).interval(heartbeat);
            WorkerBuilder::new(format!("{name}-{restart}"))
                .backend(PollWith::new(storage, strategy))
                .data(handler_ctx.clone())
                .concurrency(concurrency)
                .build(dispatch::handle)
        });
    let result = monitor
        .run_with_signal(async move {
            shutdown.await;
            Ok(())
        })
        .await;
    let _ = stop_tx.send(true);
    listener.abort();
    let _ = tracker.await;
    let _ = reconciler.await;
    result.context("queue monitor")?;
    tracing::info!(worker = %ctx.name, "worker stopped");
    Ok(())
}

/// Workers may start before the API has migrated the database.
async fn wait_for_schema(store: &PgStore) {
    let mut waited = 0u32;
    loop {
        match store.schema_ready().await {
            Ok(true) => return,
            Ok(false) if waited % 10 == 0 => tracing::info!("waiting for the API to apply database migrations"),
            Err(e) if waited % 10 == 0 => tracing::warn!(error = %e, "waiting for the database"),
            _ => {}
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
