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
    }
}

pub async fn sweep(ctx: &WorkerCtx) {
    let woken = ctx.wake_candidates(Some(STALE_AFTER), 64).await;
    if woken > 0 {
        tracing::debug!(count = woken, "reconciler re-woke queued jobs");
    }
}
