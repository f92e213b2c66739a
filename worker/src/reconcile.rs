//! The periodic sweep that makes "nothing is lost" true: the database is the
//! truth, and any QUEUED job whose wake-up was lost (Redis was down at
//! submit, a message was acknowledged without a free slot) is woken again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

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
    }
}

pub async fn sweep(ctx: &WorkerCtx) {
    let candidates = match ctx.store.dispatch_candidates(ctx.config.limits.jobs_per_user, Some(STALE_AFTER), 64).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "reconciler: database unavailable");
            return;
        }
    };
    let ids: Vec<Uuid> = candidates.iter().map(|c| c.job_id).collect();
    if ids.is_empty() {
        return;
    }
    match ctx.queue.push(&ids).await {
        Ok(()) => {
            tracing::debug!(count = ids.len(), "reconciler re-woke queued jobs");
            if let Err(e) = ctx.store.mark_enqueued(&ids).await {
                tracing::warn!(error = %e, "reconciler: could not record wake-ups");
            }
        }
        Err(e) => tracing::debug!(error = %e, "reconciler: queue unavailable; retrying"),
    }
}
