//! Dispatch: claim a QUEUED job, take its slots, stage its working dir on
//! Ray, submit it (idempotently: `submission_id` = job id) and mark it
//! PENDING. A user stop can land at any point; each slow step is followed by
//! a look at the job, and what was started is undone.

use std::collections::BTreeMap;
use std::sync::Arc;

use apalis::prelude::{BoxDynError, Data};
use shared::artifact::{self, ArtifactLimits};
use shared::config::RunnerKind;
use shared::domain::JobStatus;
use shared::jobenv::{self, JobSecrets};
use shared::limiter::Acquire;
use shared::local_runner::LOCAL_HOST;
use shared::queue::Dispatch;
use shared::ray::{RayError, SubmitOutcome, SubmitRequest};
use shared::storage::{DispatchJob, StorageError};
use tracing::Instrument;
use uuid::Uuid;

use crate::context::WorkerCtx;

/// Transient failures after which a job is failed rather than retried.
const MAX_DISPATCH_ATTEMPTS: i32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// Worth another try later (Ray or a backing service unreachable).
    #[error("{0}")]
    Transient(String),
    /// Will never work: the job fails with this reason.
    #[error("{0}")]
    Permanent(String),
}

impl From<StorageError> for DispatchError {
    fn from(e: StorageError) -> Self {
        DispatchError::Transient(e.to_string())
    }
}

impl From<RayError> for DispatchError {
    fn from(e: RayError) -> Self {
        if e.is_transient() {
            DispatchError::Transient(e.to_string())
        } else {
            DispatchError::Permanent(format!("Ray refused the job: {e}"))
        }
    }
}

/// How a claimed job left the dispatcher.
enum Submitted {
    Pending,
    StoppedBeforeSubmit,
    StoppedAfterSubmit,
    /// Our claim lapsed and another worker owns the job now.
    TakenOver,
}

/// The apalis handler: one wake-up, at most one job submitted.
pub async fn handle(task: Dispatch, ctx: Data<Arc<WorkerCtx>>) -> Result<(), BoxDynError> {
    let ctx: Arc<WorkerCtx> = (*ctx).clone();
    let span = tracing::info_span!("dispatch", job_id = %task.job_id, worker = %ctx.name, user = tracing::field::Empty);
    dispatch(&ctx, task.job_id)
        .instrument(span)
        .await
        .map_err(|e| Box::new(e) as BoxDynError)
}

pub async fn dispatch(ctx: &WorkerCtx, job_id: Uuid) -> Result<(), DispatchError> {
    let tuning = &ctx.config.worker;
    // The claim is the only gate: a duplicate wake-up, or one for a job
    // that left QUEUED, ends here.
    let Some(job) = ctx
        .store
        .claim_for_dispatch(job_id, &ctx.name, tuning.claim_ttl)
        .await?
    else {
        return Ok(());
    };
    tracing::Span::current().record("user", job.username.as_str());
    let id = job_id.to_string();
    let limits = &ctx.config.limits;
    let acquired = ctx
        .limiter
        .acquire(
            &job.username,
            &id,
            limits.jobs_per_user,
            limits.max_clusters,
            tuning.lease_ttl,
        )
        .await;
    match acquired {
        Ok(Acquire::Granted) => {}
        Ok(full) => {
            // Not an error and not a retry: the job waits in QUEUED and a
            // freed slot (or the reconciler) wakes it again.
            tracing::debug!(?full, "no free slot; the job stays queued");
            ctx.store.release_claim(job_id, &ctx.name).await?;
            return Ok(());
        }
        Err(e) => {
            ctx.store.release_claim(job_id, &ctx.name).await?;
            return Err(DispatchError::Transient(format!("limiter: {e}")));
        }
    }

    let outcome = with_claim_renewal(ctx, job_id, submit(ctx, &job)).await;
    match outcome {
        Ok(Submitted::Pending) => {
            tracing::info!("job submitted");
            let _ = ctx.tracked_tx.send(job_id);
            Ok(())
        }
        Ok(Submitted::StoppedAfterSubmit) => {
            // The tracker owns it now: it stops it on Ray, keeps the logs and
            // releases the slots.
            tracing::info!("job stopped while it was being submitted; stopping it");
            let _ = ctx.tracked_tx.send(job_id);
            Ok(())
        }
        Ok(Submitted::TakenOver) => {
            // Its slots are the same lease members the new owner holds: keep them.
            tracing::warn!("the dispatch claim lapsed and another worker took the job over");
            Ok(())
        }
        Ok(Submitted::StoppedBeforeSubmit) => {
            tracing::info!("job stopped before it was submitted");
            release_all(ctx, &job).await;
            Ok(())
        }
        Err(DispatchError::Permanent(reason)) => {
            tracing::warn!(%reason, "job cannot be submitted");
            ctx.store.fail_queued(job_id, &reason).await?;
            release_all(ctx, &job).await;
            ctx.wake_next().await;
            Ok(())
        }
        Err(DispatchError::Transient(reason)) if job.dispatch_attempts >= MAX_DISPATCH_ATTEMPTS => {
            let reason = format!(
                "The job could not be submitted after {MAX_DISPATCH_ATTEMPTS} attempts: {reason}"
            );
            tracing::warn!(%reason, "giving up");
            ctx.store.fail_queued(job_id, &reason).await?;
            release_all(ctx, &job).await;
            ctx.wake_next().await;
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, attempt = job.dispatch_attempts, "dispatch failed; will retry");
            release_all(ctx, &job).await;
            Err(e)
        }
    }
}

async fn release_all(ctx: &WorkerCtx, job: &DispatchJob) {
    if let Err(e) = ctx
        .limiter
        .release(&job.username, &job.id.to_string())
        .await
    {
        tracing::warn!(error = %e, "slot release failed; the lease expires on its own");
    }
    if let Err(e) = ctx.store.release_claim(job.id, &ctx.name).await {
        tracing::warn!(error = %e, "claim release failed; the claim expires on its own");
    }
}

/// Keeps the dispatch claim alive while a slow step (a large upload) runs.
async fn with_claim_renewal<T>(ctx: &WorkerCtx, job_id: Uuid, work: impl Future<Output = T>) -> T {
    let ttl = ctx.config.worker.claim_ttl;
    let renew = async {
        let mut tick = tokio::time::interval(ttl / 3);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !matches!(
                ctx.store.renew_claim(job_id, &ctx.name, ttl).await,
                Ok(true)
            ) {
                // Lost (stopped, or the claim lapsed): the steps re-check.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        out = work => out,
        _ = renew => unreachable!("renewal never ends on its own"),
    }
}

async fn still_queued(ctx: &WorkerCtx, job_id: Uuid) -> Result<bool, DispatchError> {
    Ok(ctx.store.job_status(job_id).await? == Some(JobStatus::Queued))
}

/// A working dir made ready where the job will run.
enum Staged {
    Ray {
        host: String,
        head: String,
        sha: String,
        working_dir: String,
    },
    Local,
}

/// The slow part: make the function's files available to the runner.
async fn stage(ctx: &WorkerCtx, job: &DispatchJob) -> Result<Staged, DispatchError> {
    let sha = job
        .artifact_sha256
        .clone()
        .ok_or_else(|| DispatchError::Permanent("The function has no artifact.".into()))?;
    let limits = ArtifactLimits {
        max_bytes: ctx.config.max_artifact_bytes,
        ..ArtifactLimits::default()
    };
    let load = || async {
        ctx.store
            .artifact(&sha)
            .await?
            .ok_or_else(|| DispatchError::Permanent("The function's artifact is missing.".into()))
    };
    match ctx.config.runner {
        RunnerKind::LocalProcess => {
            let tar = load().await?;
            ctx.local
                .prepare(job.id, tar, limits)
                .await
                .map_err(|e| DispatchError::Permanent(e.to_string()))?;
            Ok(Staged::Local)
        }
        RunnerKind::Ray => {
            let host = ctx.ray_host().to_string();
            let ray = ctx.ray(&host)?;
            // Packages live as long as the head's session: a restarted head at
            // the same URL has none, so the cache is keyed by session too.
            let session = ray.version_info().await?.session_name.unwrap_or_default();
            let head = format!("{host}#{session}");
            let working_dir = match ctx.cached_package(&head, &sha) {
                Some(uri) => uri,
                None => {
                    let tar = load().await?;
                    let zip =
                        tokio::task::spawn_blocking(move || artifact::tar_to_zip(&tar, &limits))
                            .await
                            .map_err(|e| DispatchError::Transient(e.to_string()))?
                            .map_err(|e| {
                                DispatchError::Permanent(format!(
                                    "The artifact cannot be used: {e}"
                                ))
                            })?;
                    let uri = ray.ensure_package(&zip).await?;
                    ctx.remember_package(&head, &sha, uri.clone());
                    uri
                }
            };
            Ok(Staged::Ray {
                host,
                head,
                sha,
                working_dir,
            })
        }
    }
}

/// Starts the job on its runner; a start the runner already saw (a retried
/// dispatch) counts as done. Returns the job's runner host.
async fn launch(
    ctx: &WorkerCtx,
    job: &DispatchJob,
    staged: Staged,
    env: BTreeMap<String, String>,
) -> Result<String, DispatchError> {
    let outcome = match staged {
        Staged::Local => {
            let outcome = ctx
                .local
                .start(job.id, &job.entrypoint, &env)
                .await
                .map_err(|e| DispatchError::Transient(e.to_string()))?;
            (outcome, LOCAL_HOST.to_string())
        }
        Staged::Ray {
            host,
            head,
            sha,
            working_dir,
        } => {
            let request = SubmitRequest {
                submission_id: job.id.to_string(),
                entrypoint: format!("python {}", job.entrypoint),
                working_dir,
                env_vars: env,
                pip: job.pip.clone(),
            };
            let ray = ctx.ray(&host)?;
            match ray.submit(&request).await {
                Ok(outcome) => (outcome, host),
                // A submit that failed on our side (a timeout) may still have
                // reached Ray: if Ray has the job, it is submitted.
                Err(_) if matches!(ray.job(&request.submission_id).await, Ok(Some(_))) => {
                    (SubmitOutcome::AlreadyExists, host)
                }
                Err(e) => {
                    // A package Ray lost is uploaded again next time.
                    ctx.forget_package(&head, &sha);
                    return Err(e.into());
                }
            }
        }
    };
    if matches!(outcome.0, SubmitOutcome::AlreadyExists) {
        tracing::info!("the runner already had this job (a retried dispatch)");
    }
    Ok(outcome.1)
}

async fn submit(ctx: &WorkerCtx, job: &DispatchJob) -> Result<Submitted, DispatchError> {
    let staged = stage(ctx, job).await?;
    let secrets = match &job.env_sealed {
        Some(sealed) => JobSecrets::open(sealed, &ctx.secrets)
            .map_err(|e| DispatchError::Permanent(e.to_string()))?,
        None => {
            return Err(DispatchError::Permanent(
                "The job's credentials are gone.".into(),
            ));
        }
    };
    let function_env: BTreeMap<String, String> = match &job.program_env_sealed {
        Some(sealed) => {
            let plain = ctx
                .secrets
                .open(sealed)
                .map_err(|e| DispatchError::Permanent(e.to_string()))?;
            serde_json::from_slice(&plain)
                .map_err(|e| DispatchError::Permanent(format!("function env_vars: {e}")))?
        }
        None => BTreeMap::new(),
    };
    write_job_files(ctx, job).await?;
    let env = jobenv::build_env(
        job.id,
        &job.username,
        &job.arguments,
        &secrets,
        &ctx.config.ray_data_path,
        &function_env,
    );

    if !ctx.config.worker.dispatch_pause.is_zero() {
        tokio::time::sleep(ctx.config.worker.dispatch_pause).await;
    }
    if !still_queued(ctx, job.id).await? {
        return Ok(Submitted::StoppedBeforeSubmit);
    }
    let host = launch(ctx, job, staged, env).await?;
    if ctx.store.mark_pending(job.id, &ctx.name, &host).await? {
        Ok(Submitted::Pending)
    } else if !ctx
        .store
        .job_status(job.id)
        .await?
        .is_some_and(|s| s.is_terminal())
    {
        // Not a stop: our claim lapsed and another worker is submitting (or
        // already submitted) the same job. Stopping it would kill its run.
        Ok(Submitted::TakenOver)
    } else {
        if let Ok(runner) = ctx.runner(&host) {
            let _ = runner.stop(job.id).await;
        }
        ctx.store.mark_submitted_after_stop(job.id, &host).await?;
        Ok(Submitted::StoppedAfterSubmit)
    }
}

/// The arguments file the current SDK reads, and the results directory it
/// writes into, under the data dir shared with the Ray node.
async fn write_job_files(ctx: &WorkerCtx, job: &DispatchJob) -> Result<(), DispatchError> {
    let args_path = jobenv::arguments_file(&ctx.config.data_dir, &job.username, job.id);
    let results_path = jobenv::results_file(&ctx.config.data_dir, &job.username, job.id);
    let io = |e: std::io::Error| DispatchError::Transient(format!("writing job files: {e}"));
    for dir in [args_path.parent(), results_path.parent()]
        .into_iter()
        .flatten()
    {
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
    }
    tokio::fs::write(&args_path, job.arguments.as_bytes())
        .await
        .map_err(io)?;
    Ok(())
}
