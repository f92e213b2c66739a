//! All SQL of the Postgres backend.
//!
//! Every status change is a compare-and-set (`WHERE status = ANY($from)`) that
//! writes its job event in the same transaction, and each writer touches only
//! its own columns, so concurrent API calls and workers cannot undo each other.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
// Dynamic statements below are assembled only from the column-list constants
// of this file; user input always goes through bind parameters.
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::*;
use crate::domain::{EventContext, EventOrigin, JobStatus};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

const PROGRAM_COLUMNS: &str = "p.id, p.author_id, p.title, p.provider, p.entrypoint, p.artifact_sha256, \
     p.artifact_name, p.dependencies, p.env_vars_sealed, p.description, p.documentation_url, p.type, \
     p.version, p.runner, p.arguments_schema, p.created";

const JOB_COLUMNS: &str = "j.id, j.author_id, j.program_id, j.status, j.sub_status, j.arguments, j.result, \
     j.logs, j.status_reason, j.ray_host, j.ray_submitted, j.ray_start, j.ray_end, j.finalized, j.created, j.updated";

fn status_of(row: &PgRow, col: &str) -> StorageResult<JobStatus> {
    let raw: String = row.try_get(col)?;
    raw.parse()
        .map_err(|e: crate::domain::UnknownStatus| StorageError::Corrupt(e.to_string()))
}

fn program_from(row: &PgRow, prefix: &str) -> StorageResult<Program> {
    let c = |name: &str| format!("{prefix}{name}");
    Ok(Program {
        id: row.try_get(c("id").as_str())?,
        author_id: row.try_get(c("author_id").as_str())?,
        title: row.try_get(c("title").as_str())?,
        provider: row.try_get(c("provider").as_str())?,
        entrypoint: row.try_get(c("entrypoint").as_str())?,
        artifact_sha256: row.try_get(c("artifact_sha256").as_str())?,
        artifact_name: row.try_get(c("artifact_name").as_str())?,
        dependencies: row.try_get(c("dependencies").as_str())?,
        env_vars_sealed: row.try_get(c("env_vars_sealed").as_str())?,
        description: row.try_get(c("description").as_str())?,
        documentation_url: row.try_get(c("documentation_url").as_str())?,
        program_type: row.try_get(c("type").as_str())?,
        version: row.try_get(c("version").as_str())?,
        runner: row.try_get(c("runner").as_str())?,
        arguments_schema: row.try_get(c("arguments_schema").as_str())?,
        created: row.try_get(c("created").as_str())?,
    })
}

fn job_from(row: &PgRow) -> StorageResult<Job> {
    Ok(Job {
        id: row.try_get("id")?,
        author_id: row.try_get("author_id")?,
        program_id: row.try_get("program_id")?,
        status: status_of(row, "status")?,
        sub_status: row.try_get("sub_status")?,
        arguments: row.try_get("arguments")?,
        result: row.try_get("result")?,
        logs: row.try_get("logs")?,
        status_reason: row.try_get("status_reason")?,
        ray_host: row.try_get("ray_host")?,
        ray_submitted: row.try_get("ray_submitted")?,
        ray_start: row.try_get("ray_start")?,
        ray_end: row.try_get("ray_end")?,
        finalized: row.try_get("finalized")?,
        created: row.try_get("created")?,
        updated: row.try_get("updated")?,
    })
}

async fn status_event(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    status: JobStatus,
    origin: EventOrigin,
    context: EventContext,
) -> StorageResult<()> {
    event(
        tx,
        job_id,
        "STATUS_CHANGE",
        origin,
        context,
        json!({ "status": status.as_str() }),
    )
    .await
}

/// The bookkeeping of every move into a terminal state: the job no longer
/// counts against its author's active limit, and the move is recorded.
async fn ended(
    tx: &mut Transaction<'_, Postgres>,
    author_id: Uuid,
    job_id: Uuid,
    status: JobStatus,
    origin: EventOrigin,
    context: EventContext,
) -> StorageResult<()> {
    sqlx::query("UPDATE users SET active_jobs = active_jobs - 1 WHERE id = $1")
        .bind(author_id)
        .execute(&mut **tx)
        .await?;
    status_event(tx, job_id, status, origin, context).await
}

async fn event(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    event_type: &str,
    origin: EventOrigin,
    context: EventContext,
    data: Value,
) -> StorageResult<()> {
    sqlx::query("INSERT INTO job_events (job_id, event_type, origin, context, data) VALUES ($1, $2, $3, $4, $5)")
        .bind(job_id)
        .bind(event_type)
        .bind(origin.as_str())
        .bind(context.as_str())
        .bind(data)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Checks a batch of allowed moves against the domain state machine, so SQL
/// can never perform a transition the domain forbids.
fn assert_legal(from: &[JobStatus], to: JobStatus) -> StorageResult<()> {
    for f in from {
        f.transition(to)
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
    }
    Ok(())
}

impl PgStore {
    /// Connects with a pool sized for one process of the gateway.
    pub async fn connect(url: &str, max_connections: u32) -> StorageResult<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(PgStore { pool })
    }

    pub fn from_pool(pool: PgPool) -> Self {
        PgStore { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies migrations. sqlx takes a Postgres advisory lock around them,
    /// so replicas starting together apply each migration exactly once.
    pub async fn migrate(&self) -> StorageResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// True once every migration this binary knows is applied (workers wait
    /// for the API to migrate rather than racing it).
    pub async fn schema_ready(&self) -> StorageResult<bool> {
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let exists: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
                .fetch_one(&self.pool)
                .await?;
        if exists.is_none() {
            return Ok(false);
        }
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        Ok(applied.unwrap_or(0) >= latest)
    }

    pub async fn ping(&self) -> StorageResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // ---- users -------------------------------------------------------------

    pub async fn ensure_user(&self, username: &str) -> StorageResult<User> {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO users (id, username) VALUES ($1, $2) \
             ON CONFLICT (username) DO UPDATE SET username = EXCLUDED.username RETURNING id",
        )
        .bind(Uuid::new_v4())
        .bind(username)
        .fetch_one(&self.pool)
        .await?;
        Ok(User {
            id,
            username: username.to_string(),
        })
    }

    // ---- artifacts and programs --------------------------------------------

    pub async fn put_artifact(&self, sha256: &str, data: &[u8]) -> StorageResult<()> {
        sqlx::query("INSERT INTO artifacts (sha256, size, data) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING")
            .bind(sha256)
            .bind(data.len() as i64)
            .bind(data)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn artifact(&self, sha256: &str) -> StorageResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT data FROM artifacts WHERE sha256 = $1")
                .bind(sha256)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Creates or updates the author's function of that title. On create a
    /// missing entrypoint defaults to `main.py`.
    pub async fn upsert_program(
        &self,
        author_id: Uuid,
        p: &ProgramUpsert,
    ) -> StorageResult<Program> {
        let artifact_sha = p.artifact.as_ref().map(|(sha, _)| sha.clone());
        let artifact_name = p.artifact.as_ref().map(|(_, name)| name.clone());
        let sql = format!(
            "INSERT INTO programs AS p (id, author_id, title, entrypoint, artifact_sha256, artifact_name, dependencies, \
                 env_vars_sealed, description, type, version, arguments_schema) \
             VALUES ($1, $2, $3, COALESCE($4, 'main.py'), $5, $6, COALESCE($7, '[]'::jsonb), $8, COALESCE($9, ''), \
                 COALESCE($10, 'GENERIC'), $11, COALESCE($12, '{{}}')) \
             ON CONFLICT (author_id, title) DO UPDATE SET \
                 entrypoint = COALESCE($4, p.entrypoint), \
                 artifact_sha256 = COALESCE($5, p.artifact_sha256), \
                 artifact_name = COALESCE($6, p.artifact_name), \
                 dependencies = COALESCE($7, p.dependencies), \
                 env_vars_sealed = COALESCE($8, p.env_vars_sealed), \
                 description = COALESCE($9, p.description), \
                 type = COALESCE($10, p.type), \
                 version = COALESCE($11, p.version), \
                 arguments_schema = COALESCE($12, p.arguments_schema), \
                 updated = now() \
             RETURNING {PROGRAM_COLUMNS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(Uuid::new_v4())
            .bind(author_id)
            .bind(&p.title)
            .bind(&p.entrypoint)
            .bind(artifact_sha)
            .bind(artifact_name)
            .bind(&p.dependencies)
            .bind(&p.env_vars_sealed)
            .bind(&p.description)
            .bind(&p.program_type)
            .bind(&p.version)
            .bind(&p.arguments_schema)
            .fetch_one(&self.pool)
            .await?;
        program_from(&row, "")
    }

    pub async fn programs(&self, author_id: Uuid) -> StorageResult<Vec<Program>> {
        let sql = format!(
            "SELECT {PROGRAM_COLUMNS} FROM programs p WHERE p.author_id = $1 ORDER BY p.created DESC"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(author_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| program_from(r, "")).collect()
    }

    pub async fn program_by_title(
        &self,
        author_id: Uuid,
        title: &str,
    ) -> StorageResult<Option<Program>> {
        let sql = format!(
            "SELECT {PROGRAM_COLUMNS} FROM programs p WHERE p.author_id = $1 AND p.title = $2"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(author_id)
            .bind(title)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| program_from(r, "")).transpose()
    }

    // ---- jobs: API side ----------------------------------------------------

    /// Inserts a QUEUED job unless the author already has `active_limit`
    /// active jobs; the check and the insert are one transaction around a
    /// conditional counter update, so concurrent runs cannot both pass.
    pub async fn create_job(&self, new: &NewJob, active_limit: u32) -> StorageResult<CreateJob> {
        let mut tx = self.pool.begin().await?;
        let admitted = sqlx::query(
            "UPDATE users SET active_jobs = active_jobs + 1, total_jobs = total_jobs + 1 \
             WHERE id = $1 AND active_jobs < $2",
        )
        .bind(new.author_id)
        .bind(active_limit as i32)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if admitted == 0 {
            return Ok(CreateJob::LimitReached);
        }
        let sql = format!(
            "INSERT INTO jobs AS j (id, author_id, program_id, status, arguments, config, env_sealed, pip) \
             VALUES ($1, $2, $3, 'QUEUED', $4, $5, $6, $7) RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(new.id)
            .bind(new.author_id)
            .bind(new.program_id)
            .bind(&new.arguments)
            .bind(&new.config)
            .bind(&new.env_sealed)
            .bind(json!(new.pip))
            .fetch_one(&mut *tx)
            .await?;
        status_event(
            &mut tx,
            new.id,
            JobStatus::Queued,
            EventOrigin::Api,
            EventContext::RunProgram,
        )
        .await?;
        tx.commit().await?;
        Ok(CreateJob::Created(job_from(&row)?))
    }

    /// Records that a queue wake-up was pushed for these jobs.
    pub async fn mark_enqueued(&self, ids: &[Uuid]) -> StorageResult<()> {
        sqlx::query("UPDATE jobs SET enqueued_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The author's job with its program, or `None` (also for other users' jobs).
    pub async fn job(&self, author_id: Uuid, id: Uuid) -> StorageResult<Option<JobView>> {
        let program_columns: Vec<String> = PROGRAM_COLUMNS
            .split(", ")
            .map(|c| format!("{c} AS p_{}", c.trim_start_matches("p.")))
            .collect();
        let sql = format!(
            "SELECT {JOB_COLUMNS}, {} FROM jobs j JOIN programs p ON p.id = j.program_id \
             WHERE j.id = $1 AND j.author_id = $2",
            program_columns.join(", ")
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(author_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(JobView {
                job: job_from(&r)?,
                program: program_from(&r, "p_")?,
            })
        })
        .transpose()
    }

    /// A page of the author's jobs, newest first, and the total count. The
    /// unfiltered count comes from the per-user counter, not `COUNT(*)`.
    pub async fn list_jobs(
        &self,
        author_id: Uuid,
        filter: &JobFilter,
        limit: Option<i64>,
        offset: i64,
    ) -> StorageResult<(i64, Vec<JobListRow>)> {
        let unfiltered = filter.function.is_none()
            && filter.status.is_none()
            && filter.created_after.is_none()
            && filter.catalog.is_none();
        let conditions = "j.author_id = $1 \
             AND ($2::text IS NULL OR p.title = $2) \
             AND ($3::text IS NULL OR j.status = $3) \
             AND ($4::timestamptz IS NULL OR j.created >= $4) \
             AND ($5::bool IS NULL OR (p.provider IS NOT NULL) = $5)";
        let page_sql = format!(
            "SELECT j.id, j.status, j.sub_status, j.created, p.id AS program_id, p.title, p.provider \
             FROM jobs j JOIN programs p ON p.id = j.program_id WHERE {conditions} \
             ORDER BY j.created DESC, j.id DESC LIMIT $6 OFFSET $7"
        );
        let status = filter.status.map(|s| s.as_str().to_string());
        let rows = sqlx::query(AssertSqlSafe(page_sql))
            .bind(author_id)
            .bind(&filter.function)
            .bind(&status)
            .bind(filter.created_after)
            .bind(filter.catalog)
            .bind(limit)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        let count: i64 = if unfiltered {
            sqlx::query_scalar("SELECT total_jobs FROM users WHERE id = $1")
                .bind(author_id)
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(0)
        } else {
            let count_sql = format!(
                "SELECT count(*) FROM jobs j JOIN programs p ON p.id = j.program_id WHERE {conditions}"
            );
            sqlx::query_scalar(AssertSqlSafe(count_sql))
                .bind(author_id)
                .bind(&filter.function)
                .bind(&status)
                .bind(filter.created_after)
                .bind(filter.catalog)
                .fetch_one(&self.pool)
                .await?
        };
        let rows = rows
            .iter()
            .map(|r| {
                Ok(JobListRow {
                    id: r.try_get("id")?,
                    status: status_of(r, "status")?,
                    sub_status: r.try_get("sub_status")?,
                    created: r.try_get("created")?,
                    program_id: r.try_get("program_id")?,
                    program_title: r.try_get("title")?,
                    program_provider: r.try_get("provider")?,
                })
            })
            .collect::<StorageResult<Vec<_>>>()?;
        Ok((count, rows))
    }

    /// Stores a result the function POSTed. Returns false when the job is
    /// not the author's.
    pub async fn save_posted_result(
        &self,
        author_id: Uuid,
        id: Uuid,
        result: &str,
    ) -> StorageResult<bool> {
        let n = sqlx::query(
            "UPDATE jobs SET result = $3, updated = now() WHERE id = $1 AND author_id = $2",
        )
        .bind(id)
        .bind(author_id)
        .bind(result)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    pub async fn set_sub_status(
        &self,
        author_id: Uuid,
        id: Uuid,
        sub: &str,
    ) -> StorageResult<SubStatusOutcome> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT status, sub_status FROM jobs WHERE id = $1 AND author_id = $2 FOR UPDATE",
        )
        .bind(id)
        .bind(author_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(SubStatusOutcome::NotFound);
        };
        let status = status_of(&row, "status")?;
        if status.is_terminal() {
            return Ok(SubStatusOutcome::NotActive(status));
        }
        let previous: Option<String> = row.try_get("sub_status")?;
        if previous.as_deref() != Some(sub) {
            sqlx::query("UPDATE jobs SET sub_status = $2, updated = now() WHERE id = $1")
                .bind(id)
                .bind(sub)
                .execute(&mut *tx)
                .await?;
            event(
                &mut tx,
                id,
                "SUB_STATUS_CHANGE",
                EventOrigin::Api,
                EventContext::SetSubStatus,
                json!({ "sub_status": sub }),
            )
            .await?;
        }
        tx.commit().await?;
        match self.job(author_id, id).await? {
            Some(view) => Ok(SubStatusOutcome::Updated(view)),
            None => Ok(SubStatusOutcome::NotFound),
        }
    }

    /// Adds an ERROR event from the running function. `Ok(None)` = not found,
    /// `Ok(Some(false))` = the job is not active.
    pub async fn add_error_event(
        &self,
        author_id: Uuid,
        id: Uuid,
        data: Value,
    ) -> StorageResult<Option<bool>> {
        let mut tx = self.pool.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 AND author_id = $2")
                .bind(id)
                .bind(author_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(status) = status else {
            return Ok(None);
        };
        let status: JobStatus = status
            .parse()
            .map_err(|e: crate::domain::UnknownStatus| StorageError::Corrupt(e.to_string()))?;
        if status.is_terminal() {
            return Ok(Some(false));
        }
        event(
            &mut tx,
            id,
            "ERROR",
            EventOrigin::Api,
            EventContext::SendError,
            data,
        )
        .await?;
        tx.commit().await?;
        Ok(Some(true))
    }

    /// The job's events, newest first; `None` when the job is not the author's.
    pub async fn events(
        &self,
        author_id: Uuid,
        id: Uuid,
        event_type: Option<&str>,
    ) -> StorageResult<Option<Vec<JobEvent>>> {
        let owned: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM jobs WHERE id = $1 AND author_id = $2")
                .bind(id)
                .bind(author_id)
                .fetch_optional(&self.pool)
                .await?;
        if owned.is_none() {
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT event_type, origin, context, data, created FROM job_events \
             WHERE job_id = $1 AND ($2::text IS NULL OR event_type = $2) ORDER BY id DESC",
        )
        .bind(id)
        .bind(event_type)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JobEvent {
                    event_type: r.try_get("event_type")?,
                    origin: r.try_get("origin")?,
                    context: r.try_get("context")?,
                    data: r.try_get("data")?,
                    created: r.try_get("created")?,
                })
            })
            .collect::<StorageResult<Vec<_>>>()
            .map(Some)
    }

    /// A user's stop. A QUEUED job never reached Ray, so it is final at once;
    /// a PENDING/RUNNING one is finalized by its tracker, which stops it on
    /// Ray and keeps its logs.
    pub async fn stop_job(&self, author_id: Uuid, id: Uuid) -> StorageResult<StopOutcome> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT status, ray_host FROM jobs WHERE id = $1 AND author_id = $2 FOR UPDATE",
        )
        .bind(id)
        .bind(author_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(StopOutcome::NotFound);
        };
        let was = status_of(&row, "status")?;
        if was.transition(JobStatus::Stopped).is_err() {
            return Ok(StopOutcome::AlreadyTerminal);
        }
        let ray_host: Option<String> = row.try_get("ray_host")?;
        sqlx::query(
            "UPDATE jobs SET status = 'STOPPED', sub_status = NULL, status_reason = 'Stopped by the user.', \
                 finalized = NOT ray_submitted, env_sealed = CASE WHEN ray_submitted THEN env_sealed END, \
                 updated = now() WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        ended(
            &mut tx,
            author_id,
            id,
            JobStatus::Stopped,
            EventOrigin::Api,
            EventContext::StopJob,
        )
        .await?;
        tx.commit().await?;
        Ok(StopOutcome::Stopped { was, ray_host })
    }

    // ---- jobs: worker side -------------------------------------------------

    /// Takes the dispatch claim on a QUEUED job: nobody holds it, or the
    /// holder's claim ran out (a dead worker). Returns what submitting needs.
    /// A live claim is exclusive even for its own worker: one process runs
    /// many handlers, and two wake-ups of the same job (the API's push and a
    /// reconciler sweep) must not both submit it.
    pub async fn claim_for_dispatch(
        &self,
        id: Uuid,
        worker: &str,
        ttl: Duration,
    ) -> StorageResult<Option<DispatchJob>> {
        let row = sqlx::query(
            "WITH claimed AS ( \
                 UPDATE jobs SET claimed_by = $2, claim_until = now() + make_interval(secs => $3), \
                     dispatch_attempts = dispatch_attempts + 1 \
                 WHERE id = $1 AND status = 'QUEUED' \
                   AND (claimed_by IS NULL OR claim_until < now()) \
                 RETURNING id, author_id, program_id, arguments, env_sealed, pip, dispatch_attempts) \
             SELECT c.id, c.author_id, u.username, p.title, p.provider, p.entrypoint, p.artifact_sha256, \
                 c.arguments, c.env_sealed, p.env_vars_sealed, c.pip, c.dispatch_attempts \
             FROM claimed c JOIN users u ON u.id = c.author_id JOIN programs p ON p.id = c.program_id",
        )
        .bind(id)
        .bind(worker)
        .bind(ttl.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let pip: Value = r.try_get("pip")?;
        Ok(Some(DispatchJob {
            id: r.try_get("id")?,
            author_id: r.try_get("author_id")?,
            username: r.try_get("username")?,
            program_title: r.try_get("title")?,
            provider: r.try_get("provider")?,
            entrypoint: r.try_get("entrypoint")?,
            artifact_sha256: r.try_get("artifact_sha256")?,
            arguments: r.try_get("arguments")?,
            env_sealed: r.try_get("env_sealed")?,
            program_env_sealed: r.try_get("env_vars_sealed")?,
            pip: serde_json::from_value(pip)
                .map_err(|e| StorageError::Corrupt(format!("jobs.pip: {e}")))?,
            dispatch_attempts: r.try_get("dispatch_attempts")?,
        }))
    }

    /// Extends this worker's claim; false when it lost it (stopped, or taken over).
    pub async fn renew_claim(&self, id: Uuid, worker: &str, ttl: Duration) -> StorageResult<bool> {
        let n = sqlx::query(
            "UPDATE jobs SET claim_until = now() + make_interval(secs => $3) \
             WHERE id = $1 AND claimed_by = $2 AND status = 'QUEUED'",
        )
        .bind(id)
        .bind(worker)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Gives the claim back without dispatching (no slot, or a transient error).
    pub async fn release_claim(&self, id: Uuid, worker: &str) -> StorageResult<()> {
        sqlx::query("UPDATE jobs SET claimed_by = NULL, claim_until = NULL WHERE id = $1 AND claimed_by = $2")
            .bind(id)
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn job_status(&self, id: Uuid) -> StorageResult<Option<JobStatus>> {
        let s: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        s.map(|s| {
            s.parse()
                .map_err(|e: crate::domain::UnknownStatus| StorageError::Corrupt(e.to_string()))
        })
        .transpose()
    }

    /// QUEUED → PENDING after Ray accepted the job. False when the job left
    /// QUEUED meanwhile (a user stop won the race); the caller then records
    /// the submission with [`Self::mark_submitted_after_stop`] and stops it on Ray.
    pub async fn mark_pending(
        &self,
        id: Uuid,
        worker: &str,
        ray_host: &str,
    ) -> StorageResult<bool> {
        assert_legal(&[JobStatus::Queued], JobStatus::Pending)?;
        let mut tx = self.pool.begin().await?;
        let author: Option<Uuid> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'PENDING', ray_host = $3, ray_submitted = true, claimed_by = NULL, \
                 claim_until = NULL, updated = now() \
             WHERE id = $1 AND status = 'QUEUED' AND claimed_by = $2 RETURNING author_id",
        )
        .bind(id)
        .bind(worker)
        .bind(ray_host)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(author) = author else {
            return Ok(false);
        };
        sqlx::query("UPDATE users SET last_dispatched_at = now() WHERE id = $1")
            .bind(author)
            .execute(&mut *tx)
            .await?;
        status_event(
            &mut tx,
            id,
            JobStatus::Pending,
            EventOrigin::Scheduler,
            EventContext::ScheduleJobs,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A job stopped by its user while a worker was submitting it: Ray may
    /// hold it, so hand it to the tracker, which stops it there and keeps logs.
    pub async fn mark_submitted_after_stop(&self, id: Uuid, ray_host: &str) -> StorageResult<()> {
        sqlx::query(
            "UPDATE jobs SET ray_submitted = true, finalized = false, ray_host = $2, claimed_by = NULL, \
                 claim_until = NULL, updated = now() WHERE id = $1",
        )
        .bind(id)
        .bind(ray_host)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// QUEUED → FAILED for a job that can never be submitted.
    pub async fn fail_queued(&self, id: Uuid, reason: &str) -> StorageResult<bool> {
        assert_legal(&[JobStatus::Queued], JobStatus::Failed)?;
        let mut tx = self.pool.begin().await?;
        let author: Option<Uuid> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'FAILED', status_reason = $2, logs = $2, finalized = true, env_sealed = NULL, \
                 claimed_by = NULL, claim_until = NULL, sub_status = NULL, updated = now() \
             WHERE id = $1 AND status = 'QUEUED' RETURNING author_id",
        )
        .bind(id)
        .bind(reason)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(author) = author else {
            return Ok(false);
        };
        ended(
            &mut tx,
            author,
            id,
            JobStatus::Failed,
            EventOrigin::Scheduler,
            EventContext::ScheduleJobs,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Takes (or keeps) tracking ownership of submitted, unfinalized jobs:
    /// those nobody tracks, this worker's, and those whose tracker went silent.
    pub async fn claim_tracking(
        &self,
        worker: &str,
        ttl: Duration,
        limit: i64,
    ) -> StorageResult<Vec<TrackedJob>> {
        let rows = sqlx::query(
            "WITH picked AS ( \
                 SELECT id FROM jobs WHERE ray_submitted AND NOT finalized \
                   AND (tracked_by IS NULL OR tracked_by = $1 OR track_until < now()) \
                 ORDER BY created LIMIT $3 FOR UPDATE SKIP LOCKED), \
             owned AS ( \
                 UPDATE jobs j SET tracked_by = $1, track_until = now() + make_interval(secs => $2) \
                 FROM picked WHERE j.id = picked.id \
                 RETURNING j.id, j.author_id, j.program_id, j.status, j.ray_host) \
             SELECT o.id, u.username, o.status, o.ray_host, p.title, p.provider \
             FROM owned o JOIN users u ON u.id = o.author_id JOIN programs p ON p.id = o.program_id",
        )
        .bind(worker)
        .bind(ttl.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TrackedJob {
                    id: r.try_get("id")?,
                    username: r.try_get("username")?,
                    status: status_of(r, "status")?,
                    ray_host: r
                        .try_get::<Option<String>, _>("ray_host")?
                        .unwrap_or_default(),
                    program_title: r.try_get("title")?,
                    provider: r.try_get("provider")?,
                })
            })
            .collect()
    }

    /// PENDING → RUNNING as Ray reports it.
    pub async fn mark_running(
        &self,
        id: Uuid,
        ray_start: Option<DateTime<Utc>>,
    ) -> StorageResult<bool> {
        assert_legal(&[JobStatus::Pending], JobStatus::Running)?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET status = 'RUNNING', ray_start = COALESCE($2, ray_start), updated = now() \
             WHERE id = $1 AND status = 'PENDING'",
        )
        .bind(id)
        .bind(ray_start)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        status_event(
            &mut tx,
            id,
            JobStatus::Running,
            EventOrigin::Scheduler,
            EventContext::UpdateJobStatus,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records the end of a submitted job in one transaction: the terminal
    /// status (unless a user stop already set one), final logs, the result
    /// file's content unless the function POSTed one, and wipes its secrets.
    /// Returns the job's final status.
    pub async fn finish(&self, id: Uuid, fin: &Finish) -> StorageResult<Option<JobStatus>> {
        if !fin.status.is_terminal() {
            return Err(StorageError::Corrupt(format!(
                "finish with non-terminal status {}",
                fin.status
            )));
        }
        assert_legal(&[JobStatus::Pending, JobStatus::Running], fin.status)?;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT status, author_id FROM jobs WHERE id = $1 AND NOT finalized FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let current = status_of(&row, "status")?;
        let author: Uuid = row.try_get("author_id")?;
        let moves = !current.is_terminal();
        if moves {
            // Only a submitted (PENDING/RUNNING) job can end here.
            current
                .transition(fin.status)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        }
        let final_status = if moves { fin.status } else { current };
        sqlx::query(
            "UPDATE jobs SET status = $2, status_reason = COALESCE(status_reason, $3), logs = $4, \
                 result = COALESCE(result, $5), ray_start = COALESCE($6, ray_start), ray_end = COALESCE($7, ray_end), \
                 sub_status = NULL, env_sealed = NULL, finalized = true, tracked_by = NULL, track_until = NULL, \
                 updated = now() WHERE id = $1",
        )
        .bind(id)
        .bind(final_status.as_str())
        .bind(&fin.reason)
        .bind(&fin.logs)
        .bind(&fin.result_from_file)
        .bind(fin.ray_start)
        .bind(fin.ray_end)
        .execute(&mut *tx)
        .await?;
        if moves {
            ended(
                &mut tx,
                author,
                id,
                final_status,
                EventOrigin::Scheduler,
                EventContext::UpdateJobStatus,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(final_status))
    }

    /// Jobs that deserve a dispatch wake-up: per user, the oldest QUEUED job
    /// nobody is dispatching, for users below their running limit, the user
    /// served longest ago first. `stale` limits it to jobs whose last
    /// wake-up is older than that (the reconciler's sweep).
    pub async fn dispatch_candidates(
        &self,
        jobs_per_user: u32,
        stale: Option<Duration>,
        limit: i64,
    ) -> StorageResult<Vec<Candidate>> {
        let rows = sqlx::query(
            "SELECT q.id FROM users u \
             CROSS JOIN LATERAL ( \
                 SELECT j.id, j.enqueued_at FROM jobs j \
                 WHERE j.author_id = u.id AND j.status = 'QUEUED' \
                   AND (j.claimed_by IS NULL OR j.claim_until < now()) \
                 ORDER BY j.created LIMIT 1) q \
             WHERE u.active_jobs > 0 \
               AND (SELECT count(*) FROM jobs r WHERE r.author_id = u.id AND r.status IN ('PENDING', 'RUNNING')) < $1 \
               AND ($2::float8 IS NULL OR q.enqueued_at IS NULL OR q.enqueued_at < now() - make_interval(secs => $2)) \
             ORDER BY u.last_dispatched_at NULLS FIRST LIMIT $3",
        )
        .bind(jobs_per_user as i64)
        .bind(stale.map(|d| d.as_secs_f64()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Candidate {
                    job_id: r.try_get("id")?,
                })
            })
            .collect()
    }

    /// Ended Ray jobs still held by Ray `older_than` after they ended.
    pub async fn ray_jobs_to_forget(
        &self,
        older_than: Duration,
        limit: i64,
    ) -> StorageResult<Vec<(Uuid, String)>> {
        let rows = sqlx::query(
            "SELECT id, ray_host FROM jobs WHERE finalized AND ray_submitted AND NOT ray_forgotten \
               AND ray_host IS NOT NULL AND ray_host <> 'local' \
               AND updated < now() - make_interval(secs => $1) ORDER BY updated LIMIT $2",
        )
        .bind(older_than.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("ray_host")?)))
            .collect()
    }

    pub async fn mark_ray_forgotten(&self, id: Uuid) -> StorageResult<()> {
        sqlx::query("UPDATE jobs SET ray_forgotten = true WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn setting(&self, key: &str) -> StorageResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Stores the value unless the key has one already.
    pub async fn insert_setting(&self, key: &str, value: &[u8]) -> StorageResult<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// PENDING/RUNNING jobs of every user, for rebuilding slot leases.
    pub async fn running_jobs(&self) -> StorageResult<Vec<(Uuid, String)>> {
        let rows = sqlx::query(
            "SELECT j.id, u.username FROM jobs j JOIN users u ON u.id = j.author_id \
             WHERE j.status IN ('PENDING', 'RUNNING')",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("username")?)))
            .collect()
    }
}
