//! The periodic sweep that makes "nothing is lost" true: the database is the
//! truth, and any QUEUED job whose wake-up was lost (Redis was down at
//! submit, a message was acknowledged without a free slot) is woken again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::context::WorkerCtx;

/// A job woken this recently is left alone: its wake-up may still be queued.
const STALE_AFTER: Duration = Duration::from_secs(2);

pub async fn run(ctx: Arc<WorkerCtx>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(ctx.config.worker.reconcile_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        sweep(&ctx).await;
        forget_ended_ray_jobs(&ctx).await;
        match ctx.queue.vacuum(500).await {
            Ok(n) if n > 0 => {
                tracing::debug!(count = n, "finished wake-ups removed from the queue")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "queue vacuum failed; retrying"),
        }
    }
}

/// Deletes ended jobs from Ray's job table once their retention is over:
/// Ray keeps each job's runtime_env, the job's token included, until then.
/// The database keeps everything the API serves (status, logs, result).
pub async fn forget_ended_ray_jobs(ctx: &WorkerCtx) {
    let due = match ctx
        .store
        .ray_jobs_to_forget(ctx.config.worker.ray_job_retention, 50)
        .await
    {
        Ok(due) => due,
        Err(e) => {
            tracing::debug!(error = %e, "could not list ended Ray jobs");
            return;
        }
    };
    for (id, host) in due {
        let deleted = match ctx.ray(&host) {
            Ok(ray) => ray.delete(&id.to_string()).await,
            Err(e) => Err(e),
        };
        match deleted {
            // `false`: Ray no longer knows it (a restarted head): nothing to keep.
            Ok(_) => {
                if let Err(e) = ctx.store.mark_ray_forgotten(id).await {
                    tracing::debug!(job_id = %id, error = %e, "could not record the Ray deletion");
                }
            }
            Err(e) => {
                tracing::debug!(job_id = %id, error = %e, "Ray job not deleted yet; retrying later")
            }
        }
    }
}

pub async fn sweep(ctx: &WorkerCtx) {
    let woken = ctx.wake_candidates(Some(STALE_AFTER), 64).await;
    if woken > 0 {
        tracing::debug!(count = woken, "reconciler re-woke queued jobs");
    }
}
