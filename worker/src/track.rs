//! Tracking: follow submitted jobs on Ray until they end, then store their
//! final logs and result in one transaction, release their slots and wake
//! the next job. A user stop is carried to Ray from here too.
//!
//! Ownership of a job's tracking is a lease in SQL (`tracked_by`,
//! `track_until`), so any number of workers share the work and a dead
//! worker's jobs are taken over when its lease runs out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use shared::domain::JobStatus;
use shared::jobenv;
use shared::ray::{RayJobInfo, RayJobStatus};
use shared::storage::{Finish, TrackedJob};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use uuid::Uuid;

use crate::context::WorkerCtx;

/// How long the tracking lease lasts; renewed about every half second.
const TRACK_TTL: Duration = Duration::from_secs(10);
const REFRESH_EVERY: Duration = Duration::from_millis(500);
/// A runner silent this long fails its jobs.
const UNREACHABLE_GIVE_UP: Duration = Duration::from_secs(120);
/// A result file larger than this is not stored (the function misbehaved).
const MAX_RESULT_BYTES: u64 = 64 * 1024 * 1024;

struct Tracked {
    job: TrackedJob,
    unreachable_since: Option<Instant>,
    last_stop_sent: Option<Instant>,
}

pub async fn run(
    ctx: Arc<WorkerCtx>,
    mut submitted: mpsc::UnboundedReceiver<Uuid>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut owned: HashMap<Uuid, Tracked> = HashMap::new();
    let mut last_refresh: Option<Instant> = None;
    let mut last_renew = Instant::now();
    loop {
        let mut refresh = last_refresh.is_none_or(|t| t.elapsed() >= REFRESH_EVERY);
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = submitted.recv() => refresh = true,
            _ = tokio::time::sleep(ctx.config.worker.track_interval) => {}
        }
        if refresh {
            match ctx.store.claim_tracking(&ctx.name, TRACK_TTL, 1000).await {
                Ok(jobs) => {
                    let mut next = HashMap::with_capacity(jobs.len());
                    for job in jobs {
                        let previous = owned.remove(&job.id);
                        next.insert(
                            job.id,
                            Tracked {
                                unreachable_since: previous
                                    .as_ref()
                                    .and_then(|p| p.unreachable_since),
                                last_stop_sent: previous.as_ref().and_then(|p| p.last_stop_sent),
                                job,
                            },
                        );
                    }
                    owned = next;
                    last_refresh = Some(Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "could not refresh tracked jobs"),
            }
        }
        if last_renew.elapsed() >= ctx.config.worker.lease_ttl / 6 {
            renew_leases(&ctx, &owned).await;
            last_renew = Instant::now();
        }
        // Jobs are moved through the polls by value and those still running
        // come back into the map.
        let batch: Vec<Tracked> = owned.drain().map(|(_, t)| t).collect();
        let still_running: Vec<Tracked> = futures::stream::iter(batch)
            .map(|mut t| {
                let span = tracing::info_span!("track", job_id = %t.job.id, user = %t.job.username);
                let ctx = ctx.clone();
                async move {
                    let done = poll(&ctx, &mut t).await;
                    (!done).then_some(t)
                }
                .instrument(span)
            })
            .buffer_unordered(32)
            .filter_map(|t| async move { t })
            .collect()
            .await;
        owned.extend(still_running.into_iter().map(|t| (t.job.id, t)));
    }
}

/// Keeps the slot leases of running jobs alive; re-adds them after a Redis
/// restart lost them.
async fn renew_leases(ctx: &WorkerCtx, owned: &HashMap<Uuid, Tracked>) {
    for t in owned.values().filter(|t| !t.job.status.is_terminal()) {
        if let Err(e) = ctx
            .limiter
            .renew(
                &t.job.username,
                &t.job.id.to_string(),
                ctx.config.worker.lease_ttl,
            )
            .await
        {
            tracing::warn!(job_id = %t.job.id, error = %e, "lease renewal failed");
            return;
        }
    }
}

fn time_of(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(DateTime::from_timestamp_millis)
}

fn final_status(ray: RayJobStatus) -> Option<JobStatus> {
    match ray {
        RayJobStatus::Pending | RayJobStatus::Running => None,
        RayJobStatus::Succeeded => Some(JobStatus::Succeeded),
        RayJobStatus::Stopped => Some(JobStatus::Stopped),
        RayJobStatus::Failed | RayJobStatus::Unknown => Some(JobStatus::Failed),
    }
}

/// One look at one job. Returns true when the job is finished and no longer tracked.
async fn poll(ctx: &WorkerCtx, t: &mut Tracked) -> bool {
    let runner = match ctx.runner(&t.job.ray_host) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "bad Ray host");
            return finish(
                ctx,
                &t.job,
                JobStatus::Failed,
                Some(format!("Invalid Ray host: {e}")),
                None,
            )
            .await;
        }
    };
    let info = match runner.job(t.job.id).await {
        Ok(Some(info)) => {
            t.unreachable_since = None;
            info
        }
        Ok(None) => {
            let reason =
                "The job is no longer known to Ray (its head restarted or deleted it).".to_string();
            return finish(ctx, &t.job, JobStatus::Failed, Some(reason), None).await;
        }
        Err(e) => {
            let since = *t.unreachable_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= UNREACHABLE_GIVE_UP {
                let reason = format!(
                    "Ray was unreachable for {} s: {e}",
                    UNREACHABLE_GIVE_UP.as_secs()
                );
                return finish(ctx, &t.job, JobStatus::Failed, Some(reason), None).await;
            }
            tracing::debug!(error = %e, "Ray status unavailable");
            return false;
        }
    };
    let ended = final_status(info.status);
    if t.job.status == JobStatus::Stopped {
        if ended.is_none() {
            if t.last_stop_sent
                .is_none_or(|s| s.elapsed() >= Duration::from_secs(1))
            {
                t.last_stop_sent = Some(Instant::now());
                if let Err(e) = runner.stop(t.job.id).await {
                    tracing::warn!(error = %e, "stop on Ray failed; retrying");
                }
            }
            return false;
        }
        return finish(ctx, &t.job, JobStatus::Stopped, None, Some(&info)).await;
    }
    match ended {
        None => {
            if info.status == RayJobStatus::Running && t.job.status == JobStatus::Pending {
                match ctx
                    .store
                    .mark_running(t.job.id, time_of(info.start_time_ms))
                    .await
                {
                    Ok(_) => t.job.status = JobStatus::Running,
                    Err(e) => tracing::warn!(error = %e, "could not record RUNNING"),
                }
            }
            false
        }
        Some(status) => {
            let reason = (status != JobStatus::Succeeded)
                .then(|| info.message.clone())
                .flatten();
            finish(ctx, &t.job, status, reason, Some(&info)).await
        }
    }
}

/// Stores the end of a job and frees what it held. True when recorded.
async fn finish(
    ctx: &WorkerCtx,
    job: &TrackedJob,
    status: JobStatus,
    reason: Option<String>,
    info: Option<&RayJobInfo>,
) -> bool {
    let logs = match ctx.runner(&job.ray_host) {
        Ok(runner) => match runner.logs_tail(job.id, ctx.config.logs_size_limit).await {
            Ok(logs) => Some(logs),
            Err(e) => Some(format!("Logs are not available: {e}")),
        },
        Err(_) => None,
    };
    // The reason a job failed is stated at the end of its logs, where the
    // client looks (it quotes lines with "error" when a job ends in ERROR).
    let logs = match (logs, &reason) {
        (logs, Some(r)) if status == JobStatus::Failed => {
            let first_line: String = r
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(500)
                .collect();
            let mut text = logs.unwrap_or_default();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("[gateway] error: {first_line}\n"));
            Some(text)
        }
        (logs, _) => logs,
    };
    let result_path = jobenv::results_file(&ctx.config.data_dir, &job.username, job.id);
    let result_from_file = read_result(&result_path).await;
    let fin = Finish {
        status,
        reason,
        logs,
        result_from_file,
        ray_start: info.and_then(|i| time_of(i.start_time_ms)),
        ray_end: info.and_then(|i| time_of(i.end_time_ms)),
    };
    match ctx.store.finish(job.id, &fin).await {
        Ok(final_status) => {
            if let Some(s) = final_status {
                tracing::info!(status = %s, "job finished");
            }
            if let Err(e) = ctx
                .limiter
                .release(&job.username, &job.id.to_string())
                .await
            {
                tracing::warn!(error = %e, "slot release failed; the lease expires on its own");
            }
            let args = jobenv::arguments_file(&ctx.config.data_dir, &job.username, job.id);
            let _ = tokio::fs::remove_file(args).await;
            if crate::runner::Runner::is_local(&job.ray_host) {
                // Logs are in the database now; the working dir has served.
                ctx.local.cleanup(job.id).await;
            }
            ctx.wake_next().await;
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not record the end of the job; retrying");
            false
        }
    }
}

async fn read_result(path: &std::path::Path) -> Option<String> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    if meta.len() > MAX_RESULT_BYTES {
        tracing::warn!(bytes = meta.len(), "result file too large; not stored");
        return None;
    }
    tokio::fs::read_to_string(path).await.ok()
}
