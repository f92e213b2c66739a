//! The gateway's workers: dispatch, tracking and the reconciler. In the
//! distributed gateway each `gateway-worker` process takes wake-ups from the
//! apalis queue in Redis; the embedded gateway runs the same code in-process
//! with an in-process queue.

pub mod context;
pub mod dispatch;
pub mod reconcile;
pub mod runner;
pub mod track;
pub mod wake;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apalis::prelude::{Monitor, PollWith, Strategy, WorkerBuilder, WorkerBuilderExt};
use apalis_redis::{ConnectionManager, RedisStorage};
use shared::config::{Backend, Config};
use shared::limiter::{Limiter, RedisLimiter};
use shared::queue::{self, Dispatch, DispatchQueue};
use shared::secrets::SecretBox;
use shared::storage::{PgStore, Store};
use tokio::sync::{Semaphore, mpsc, watch};

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

/// Where wake-ups come from.
pub enum Feed {
    /// apalis over Redis, announced on pub/sub.
    Redis {
        conn: ConnectionManager,
        redis_url: String,
    },
    /// The embedded gateway's in-process channel.
    Local(mpsc::UnboundedReceiver<Dispatch>),
}

/// What a worker runs against.
pub struct Backends {
    pub store: Store,
    pub limiter: Limiter,
    pub queue: DispatchQueue,
    pub feed: Feed,
    pub secrets: SecretBox,
}

/// Runs one distributed worker process until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Backend::Distributed {
        database_url,
        redis_url,
    } = config.backend.clone()
    else {
        anyhow::bail!(
            "configuration error: gateway-worker needs a database (DATABASE_URL or DATABASE_HOST) and REDIS_URL; the embedded gateway runs its worker inside gateway-api"
        );
    };
    let store = Store::Postgres(PgStore::connect(&database_url, 8).await.with_context(|| {
        format!(
            "connecting to Postgres at {}",
            shared::config::redact_url(&database_url)
        )
    })?);
    wait_for_schema(&store).await;
    let conn = apalis_redis::connect(redis_url.as_str())
        .await
        .with_context(|| {
            format!(
                "connecting to Redis at {}",
                shared::config::redact_url(&redis_url)
            )
        })?;
    let backends = Backends {
        store,
        limiter: Limiter::Redis(RedisLimiter::new(conn.clone(), config.redis_prefix.clone())),
        queue: DispatchQueue::new(conn.clone(), &config.redis_prefix, &config.worker),
        feed: Feed::Redis { conn, redis_url },
        secrets: SecretBox::from_config(config.secret_key.as_deref()),
    };
    run_with(config, backends, shutdown).await
}

/// Runs dispatch, tracking and the reconciler on the given backends.
pub async fn run_with(
    config: Config,
    backends: Backends,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Backends {
        store,
        limiter,
        queue,
        feed,
        secrets,
    } = backends;
    store.check_secret_key(&secrets).await?;
    // The embedded gateway has exactly one worker: a stable name lets it
    // take back its running jobs at once after a restart instead of waiting
    // for its own old tracking leases to run out.
    let name = match feed {
        Feed::Local(_) => "embedded".to_string(),
        Feed::Redis { .. } => unique_name(),
    };
    let (tracked_tx, tracked_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(WorkerCtx::new(
        name.clone(),
        Arc::new(config),
        store,
        limiter,
        queue,
        secrets,
        tracked_tx,
    ));
    tracing::info!(worker = %name, "worker started");
    rebuild_leases(&ctx).await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = tokio::spawn(track::run(ctx.clone(), tracked_rx, stop_rx.clone()));
    let reconciler = tokio::spawn(reconcile::run(ctx.clone(), stop_rx));
    let result = match feed {
        Feed::Redis { conn, redis_url } => run_apalis(ctx.clone(), conn, redis_url, shutdown).await,
        Feed::Local(rx) => {
            run_local(ctx.clone(), rx, shutdown).await;
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    let _ = tracker.await;
    let _ = reconciler.await;
    tracing::info!(worker = %ctx.name, "worker stopped");
    result
}

async fn run_apalis(
    ctx: Arc<WorkerCtx>,
    conn: ConnectionManager,
    redis_url: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let apalis_config = queue::apalis_config(&config.redis_prefix, &config.worker);
    let wake = wake::WakeSignal::default();
    let listener = tokio::spawn(wake::listen(
        redis_url,
        queue::available_channel(&apalis_config),
        wake.clone(),
    ));
    let heartbeat = config.worker.heartbeat;
    let concurrency = config.worker.concurrency;
    let name = ctx.name.clone();
    let monitor = Monitor::new()
        // A Redis outage ends the apalis worker; come back with a fresh name
        // once it is reachable again.
        .should_restart(|_, err| {
            tracing::warn!(error = %err, "queue worker stopped; restarting");
            true
        })
        .register(move |restart| {
            let storage =
                RedisStorage::<Dispatch>::new(conn.clone()).with_config(apalis_config.clone());
            // Fetch when a push is announced, and at least every heartbeat
            // (retries come due without an announcement).
            let strategy = Strategy::new().stream(wake.clone()).interval(heartbeat);
            WorkerBuilder::new(format!("{name}-{restart}"))
                .backend(PollWith::new(storage, strategy))
                .data(ctx.clone())
                .concurrency(concurrency)
                .build(dispatch::handle)
        });
    let result = monitor
        .run_with_signal(async move {
            shutdown.await;
            Ok(())
        })
        .await;
    listener.abort();
    result.context("queue monitor")
}

/// The embedded gateway's dispatch loop. Failed dispatches are not retried
/// here: the job stays QUEUED and the reconciler wakes it again.
async fn run_local(
    ctx: Arc<WorkerCtx>,
    mut rx: mpsc::UnboundedReceiver<Dispatch>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(ctx.config.worker.concurrency));
    tokio::pin!(shutdown);
    loop {
        let task = tokio::select! {
            _ = &mut shutdown => break,
            task = rx.recv() => match task {
                Some(task) => task,
                None => break,
            },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let span = tracing::info_span!("dispatch", job_id = %task.job_id, worker = %ctx.name, user = tracing::field::Empty);
            if let Err(e) =
                tracing::Instrument::instrument(dispatch::dispatch(&ctx, task.job_id), span).await
            {
                tracing::debug!(job_id = %task.job_id, error = %e, "dispatch will be retried by the reconciler");
            }
            drop(permit);
        });
    }
}

/// Slots of jobs already running count before anything new is dispatched:
/// after a restart of the embedded gateway (in-process leases are gone) or
/// of Redis. Holders renew them from then on.
async fn rebuild_leases(ctx: &WorkerCtx) {
    match ctx.store.running_jobs().await {
        Ok(jobs) => {
            for (id, user) in jobs {
                if let Err(e) = ctx
                    .limiter
                    .renew(&user, &id.to_string(), ctx.config.worker.lease_ttl)
                    .await
                {
                    tracing::warn!(error = %e, "could not restore slot leases");
                    return;
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not list running jobs to restore their slots"),
    }
}

/// Workers may start before the API has migrated the database.
pub async fn wait_for_schema(store: &Store) {
    let mut waited = 0u32;
    loop {
        match store.schema_ready().await {
            Ok(true) => return,
            Ok(false) if waited.is_multiple_of(10) => {
                tracing::info!("waiting for the API to apply database migrations")
            }
            Err(e) if waited.is_multiple_of(10) => {
                tracing::warn!(error = %e, "waiting for the database")
            }
            _ => {}
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
