//! All SQL of the SQLite backend (the embedded single-node gateway).
//!
//! Same operations and semantics as [`super::PgStore`]: every status change is
//! a compare-and-set (`WHERE status = ...`) that writes its job event in the
//! same transaction, the per-user counters move in the transaction of the
//! insert or terminal move, and each writer touches only its own columns.
//!
//! SQLite specifics:
//! * One writer at a time. All writes go through one dedicated connection
//!   (readers use a small pool beside it, which WAL allows), and every write
//!   transaction starts with `BEGIN IMMEDIATE`, so it takes the write lock up
//!   front (waiting up to the busy timeout for writers outside this store)
//!   instead of reading under a deferred transaction and failing with
//!   `SQLITE_BUSY` when upgrading; holding the lock also gives the row-level
//!   guarantees Postgres gets from `FOR UPDATE`.
//! * UUIDs are TEXT (lower-case hyphenated); timestamps are TEXT in UTC RFC
//!   3339 with exactly six fractional digits, so text order is time order;
//!   JSON is TEXT. See `migrations/sqlite/20261203000001_init.sql`.
//! * There is no `now()`: the current time is taken in Rust, inside the
//!   write transaction, so it increases with the commit order.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
// Dynamic statements below are assembled only from the column-list constants
// of this file; user input always goes through bind parameters.
use sqlx::{AssertSqlSafe, Row, Sqlite, SqliteConnection, SqlitePool, Transaction};
use uuid::Uuid;

use super::*;
use crate::domain::{EventContext, EventOrigin, JobStatus};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// sqlx takes no lock around SQLite migrations; the embedded gateway is one
/// process, so serialising its starters here makes `migrate` safe to call
/// concurrently (API and worker start together).
static MIGRATE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a statement waits for the write lock before failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct SqliteStore {
    /// Readers (WAL lets them run beside the writer).
    pool: SqlitePool,
    /// The one connection every write of this store goes through. SQLite has
    /// one writer anyway; queueing for this connection is a FIFO hand-over,
    /// where writers on several connections would poll SQLite's busy handler
    /// (sleeps of up to 100 ms under contention). The busy timeout still
    /// covers other writers of the file (another process, `pool()` users).
    writer: SqlitePool,
}

/// A write transaction (`BEGIN IMMEDIATE` on the writer connection).
/// Dereferences to the connection; dropping it rolls back.
struct WriteTx {
    tx: Transaction<'static, Sqlite>,
}

impl WriteTx {
    async fn commit(self) -> StorageResult<()> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Ends a transaction that changed nothing, releasing SQLite's lock at
    /// once, and returns `value`.
    async fn rollback_with<T>(self, value: T) -> StorageResult<T> {
        self.tx.rollback().await?;
        Ok(value)
    }
}

impl Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

const PROGRAM_COLUMNS: &str = "id, author_id, title, provider, entrypoint, artifact_sha256, artifact_name, \
     dependencies, env_vars_sealed, description, documentation_url, type, version, runner, arguments_schema, created";

const JOB_COLUMNS: &str = "id, author_id, program_id, status, sub_status, arguments, result, logs, status_reason, \
     ray_host, ray_submitted, ray_start, ray_end, finalized, created, updated";

/// `PROGRAM_COLUMNS`/`JOB_COLUMNS` qualified by a table alias, each renamed
/// with `prefix` (`p.id AS p_id, ...`).
fn qualified(columns: &str, alias: &str, prefix: &str) -> String {
    columns
        .split(", ")
        .map(|c| format!("{alias}.{c} AS {prefix}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- representation --------------------------------------------------------

/// A timestamp as stored: UTC, microseconds, fixed width (text order = time
/// order). Times outside years 0001..=9999 are clamped into them, as only
/// those have the four-digit form.
fn ts(t: DateTime<Utc>) -> String {
    let (min, max) = ts_range();
    t.clamp(min, max)
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn ts_range() -> (DateTime<Utc>, DateTime<Utc>) {
    let parse = |s: &str| DateTime::parse_from_rfc3339(s).map(|t| t.to_utc());
    match (
        parse("0001-01-01T00:00:00.000000Z"),
        parse("9999-12-31T23:59:59.999999Z"),
    ) {
        (Ok(min), Ok(max)) => (min, max),
        _ => (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC),
    }
}

fn now() -> String {
    ts(Utc::now())
}

/// `now + d` as stored (saturating).
fn now_plus(d: Duration) -> String {
    let now = Utc::now();
    let later = chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d));
    ts(later.unwrap_or(DateTime::<Utc>::MAX_UTC))
}

/// `now - d` as stored (saturating).
fn now_minus(d: Duration) -> String {
    let now = Utc::now();
    let earlier = chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d));
    ts(earlier.unwrap_or(DateTime::<Utc>::MIN_UTC))
}

fn uid(id: Uuid) -> String {
    id.hyphenated().to_string()
}

fn corrupt(col: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("{col}: {e}"))
}

fn uuid_of(row: &SqliteRow, col: &str) -> StorageResult<Uuid> {
    let raw: String = row.try_get(col)?;
    Uuid::from_str(&raw).map_err(|e| corrupt(col, e))
}

fn parse_ts(col: &str, raw: &str) -> StorageResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.to_utc())
        .map_err(|e| corrupt(col, e))
}

fn ts_of(row: &SqliteRow, col: &str) -> StorageResult<DateTime<Utc>> {
    let raw: String = row.try_get(col)?;
    parse_ts(col, &raw)
}

fn opt_ts_of(row: &SqliteRow, col: &str) -> StorageResult<Option<DateTime<Utc>>> {
    let raw: Option<String> = row.try_get(col)?;
    raw.map(|r| parse_ts(col, &r)).transpose()
}

fn json_of(row: &SqliteRow, col: &str) -> StorageResult<Value> {
    let raw: String = row.try_get(col)?;
    serde_json::from_str(&raw).map_err(|e| corrupt(col, e))
}

fn parse_status(raw: &str) -> StorageResult<JobStatus> {
    raw.parse()
        .map_err(|e: crate::domain::UnknownStatus| StorageError::Corrupt(e.to_string()))
}

fn status_of(row: &SqliteRow, col: &str) -> StorageResult<JobStatus> {
    let raw: String = row.try_get(col)?;
    parse_status(&raw)
}

fn program_from(row: &SqliteRow, prefix: &str) -> StorageResult<Program> {
    let c = |name: &str| format!("{prefix}{name}");
    Ok(Program {
        id: uuid_of(row, &c("id"))?,
        author_id: uuid_of(row, &c("author_id"))?,
        title: row.try_get(c("title").as_str())?,
        provider: row.try_get(c("provider").as_str())?,
        entrypoint: row.try_get(c("entrypoint").as_str())?,
        artifact_sha256: row.try_get(c("artifact_sha256").as_str())?,
        artifact_name: row.try_get(c("artifact_name").as_str())?,
        dependencies: json_of(row, &c("dependencies"))?,
        env_vars_sealed: row.try_get(c("env_vars_sealed").as_str())?,
        description: row.try_get(c("description").as_str())?,
        documentation_url: row.try_get(c("documentation_url").as_str())?,
        program_type: row.try_get(c("type").as_str())?,
        version: row.try_get(c("version").as_str())?,
        runner: row.try_get(c("runner").as_str())?,
        arguments_schema: row.try_get(c("arguments_schema").as_str())?,
        created: ts_of(row, &c("created"))?,
    })
}

fn job_from(row: &SqliteRow) -> StorageResult<Job> {
    Ok(Job {
        id: uuid_of(row, "id")?,
        author_id: uuid_of(row, "author_id")?,
        program_id: uuid_of(row, "program_id")?,
        status: status_of(row, "status")?,
        sub_status: row.try_get("sub_status")?,
        arguments: row.try_get("arguments")?,
        result: row.try_get("result")?,
        logs: row.try_get("logs")?,
        status_reason: row.try_get("status_reason")?,
        ray_host: row.try_get("ray_host")?,
        ray_submitted: row.try_get("ray_submitted")?,
        ray_start: opt_ts_of(row, "ray_start")?,
        ray_end: opt_ts_of(row, "ray_end")?,
        finalized: row.try_get("finalized")?,
        created: ts_of(row, "created")?,
        updated: ts_of(row, "updated")?,
    })
}

async fn status_event(
    conn: &mut SqliteConnection,
    job_id: Uuid,
    status: JobStatus,
    origin: EventOrigin,
    context: EventContext,
    at: &str,
) -> StorageResult<()> {
    event(
        conn,
        job_id,
        "STATUS_CHANGE",
        origin,
        context,
        json!({ "status": status.as_str() }),
        at,
    )
    .await
}

/// The bookkeeping of every move into a terminal state: the job no longer
/// counts against its author's active limit, and the move is recorded.
async fn ended(
    conn: &mut SqliteConnection,
    author_id: &str,
    job_id: Uuid,
    status: JobStatus,
    origin: EventOrigin,
    context: EventContext,
    at: &str,
) -> StorageResult<()> {
    sqlx::query("UPDATE users SET active_jobs = active_jobs - 1 WHERE id = ?1")
        .bind(author_id)
        .execute(&mut *conn)
        .await?;
    status_event(conn, job_id, status, origin, context, at).await
}

async fn event(
    conn: &mut SqliteConnection,
    job_id: Uuid,
    event_type: &str,
    origin: EventOrigin,
    context: EventContext,
    data: Value,
    at: &str,
) -> StorageResult<()> {
    sqlx::query(
        "INSERT INTO job_events (job_id, event_type, origin, context, data, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .bind(uid(job_id))
    .bind(event_type)
    .bind(origin.as_str())
    .bind(context.as_str())
    .bind(data.to_string())
    .bind(at)
    .execute(conn)
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

impl SqliteStore {
    /// Opens (creating if missing, with its directory) the database file:
    /// WAL journal (`synchronous = NORMAL`: a commit survives a crash of the
    /// process, not necessarily of the machine), foreign keys on, a busy
    /// timeout of several seconds, four reader connections and one writer.
    pub async fn connect(path: &Path) -> StorageResult<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(sqlx::Error::Io)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool, writer })
    }

    /// The reader pool. Writes through it work, but queue on SQLite's busy
    /// handler rather than on this store's writer connection.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A transaction holding SQLite's write lock from its first statement.
    async fn write_tx(&self) -> StorageResult<WriteTx> {
        Ok(WriteTx {
            tx: self.writer.begin_with("BEGIN IMMEDIATE").await?,
        })
    }

    /// Applies migrations; concurrent calls in this process are serialised.
    pub async fn migrate(&self) -> StorageResult<()> {
        let _guard = MIGRATE_LOCK.lock().await;
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    /// True once every migration this binary knows is applied.
    pub async fn schema_ready(&self) -> StorageResult<bool> {
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let exists: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await?;
        if exists == 0 {
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
        let id: String = sqlx::query_scalar(
            "INSERT INTO users (id, username, created) VALUES (?1, ?2, ?3) \
             ON CONFLICT (username) DO UPDATE SET username = excluded.username RETURNING id",
        )
        .bind(uid(Uuid::new_v4()))
        .bind(username)
        .bind(now())
        .fetch_one(&self.writer)
        .await?;
        Ok(User {
            id: Uuid::from_str(&id).map_err(|e| corrupt("users.id", e))?,
            username: username.to_string(),
        })
    }

    // ---- artifacts and programs --------------------------------------------

    pub async fn put_artifact(&self, sha256: &str, data: &[u8]) -> StorageResult<()> {
        sqlx::query(
            "INSERT INTO artifacts (sha256, size, data, created) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(sha256)
        .bind(data.len() as i64)
        .bind(data)
        .bind(now())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn artifact(&self, sha256: &str) -> StorageResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT data FROM artifacts WHERE sha256 = ?1")
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
            "INSERT INTO programs (id, author_id, title, entrypoint, artifact_sha256, artifact_name, dependencies, \
                 env_vars_sealed, description, type, version, arguments_schema, created, updated) \
             VALUES (?1, ?2, ?3, COALESCE(?4, 'main.py'), ?5, ?6, COALESCE(?7, '[]'), ?8, COALESCE(?9, ''), \
                 COALESCE(?10, 'GENERIC'), ?11, COALESCE(?12, '{{}}'), ?13, ?13) \
             ON CONFLICT (author_id, title) DO UPDATE SET \
                 entrypoint = COALESCE(?4, entrypoint), \
                 artifact_sha256 = COALESCE(?5, artifact_sha256), \
                 artifact_name = COALESCE(?6, artifact_name), \
                 dependencies = COALESCE(?7, dependencies), \
                 env_vars_sealed = COALESCE(?8, env_vars_sealed), \
                 description = COALESCE(?9, description), \
                 type = COALESCE(?10, type), \
                 version = COALESCE(?11, version), \
                 arguments_schema = COALESCE(?12, arguments_schema), \
                 updated = ?13 \
             RETURNING {PROGRAM_COLUMNS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(uid(Uuid::new_v4()))
            .bind(uid(author_id))
            .bind(&p.title)
            .bind(&p.entrypoint)
            .bind(artifact_sha)
            .bind(artifact_name)
            .bind(p.dependencies.as_ref().map(Value::to_string))
            .bind(&p.env_vars_sealed)
            .bind(&p.description)
            .bind(&p.program_type)
            .bind(&p.version)
            .bind(&p.arguments_schema)
            .bind(now())
            .fetch_one(&self.writer)
            .await?;
        program_from(&row, "")
    }

    pub async fn programs(&self, author_id: Uuid) -> StorageResult<Vec<Program>> {
        let sql = format!(
            "SELECT {PROGRAM_COLUMNS} FROM programs WHERE author_id = ?1 ORDER BY created DESC"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(uid(author_id))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| program_from(r, "")).collect()
    }

    pub async fn program_by_title(
        &self,
        author_id: Uuid,
        title: &str,
    ) -> StorageResult<Option<Program>> {
        let sql =
            format!("SELECT {PROGRAM_COLUMNS} FROM programs WHERE author_id = ?1 AND title = ?2");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(uid(author_id))
            .bind(title)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| program_from(r, "")).transpose()
    }

    // ---- jobs: API side ----------------------------------------------------

    /// Inserts a QUEUED job unless the author already has `active_limit`
    /// active jobs; the check and the insert are one write transaction around
    /// a conditional counter update, so concurrent runs cannot both pass.
    pub async fn create_job(&self, new: &NewJob, active_limit: u32) -> StorageResult<CreateJob> {
        let mut tx = self.write_tx().await?;
        let at = now();
        let admitted = sqlx::query(
            "UPDATE users SET active_jobs = active_jobs + 1, total_jobs = total_jobs + 1 \
             WHERE id = ?1 AND active_jobs < ?2",
        )
        .bind(uid(new.author_id))
        .bind(i64::from(active_limit))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if admitted == 0 {
            return tx.rollback_with(CreateJob::LimitReached).await;
        }
        let sql = format!(
            "INSERT INTO jobs (id, author_id, program_id, status, arguments, config, env_sealed, pip, created, updated) \
             VALUES (?1, ?2, ?3, 'QUEUED', ?4, ?5, ?6, ?7, ?8, ?8) RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(uid(new.id))
            .bind(uid(new.author_id))
            .bind(uid(new.program_id))
            .bind(&new.arguments)
            .bind(new.config.as_ref().map(Value::to_string))
            .bind(&new.env_sealed)
            .bind(json!(new.pip).to_string())
            .bind(&at)
            .fetch_one(&mut *tx)
            .await?;
        status_event(
            &mut tx,
            new.id,
            JobStatus::Queued,
            EventOrigin::Api,
            EventContext::RunProgram,
            &at,
        )
        .await?;
        tx.commit().await?;
        Ok(CreateJob::Created(job_from(&row)?))
    }

    /// Records that a queue wake-up was pushed for these jobs.
    pub async fn mark_enqueued(&self, ids: &[Uuid]) -> StorageResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = Value::from(ids.iter().map(|id| uid(*id)).collect::<Vec<_>>()).to_string();
        sqlx::query(
            "UPDATE jobs SET enqueued_at = ?1 WHERE id IN (SELECT value FROM json_each(?2))",
        )
        .bind(now())
        .bind(ids)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The author's job with its program, or `None` (also for other users' jobs).
    pub async fn job(&self, author_id: Uuid, id: Uuid) -> StorageResult<Option<JobView>> {
        let sql = format!(
            "SELECT {}, {} FROM jobs j JOIN programs p ON p.id = j.program_id \
             WHERE j.id = ?1 AND j.author_id = ?2",
            qualified(JOB_COLUMNS, "j", ""),
            qualified(PROGRAM_COLUMNS, "p", "p_"),
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(uid(id))
            .bind(uid(author_id))
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
        let conditions = "j.author_id = ?1 \
             AND (?2 IS NULL OR p.title = ?2) \
             AND (?3 IS NULL OR j.status = ?3) \
             AND (?4 IS NULL OR j.created >= ?4) \
             AND (?5 IS NULL OR (p.provider IS NOT NULL) = ?5)";
        // SQLite: a negative LIMIT means no limit (Postgres: LIMIT NULL).
        let page_sql = format!(
            "SELECT j.id, j.status, j.sub_status, j.created, p.id AS program_id, p.title, p.provider \
             FROM jobs j JOIN programs p ON p.id = j.program_id WHERE {conditions} \
             ORDER BY j.created DESC, j.id DESC LIMIT ?6 OFFSET ?7"
        );
        let author = uid(author_id);
        let status = filter.status.map(|s| s.as_str());
        let created_after = filter.created_after.map(ts);
        let rows = sqlx::query(AssertSqlSafe(page_sql))
            .bind(&author)
            .bind(&filter.function)
            .bind(status)
            .bind(&created_after)
            .bind(filter.catalog)
            .bind(limit.unwrap_or(-1))
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        let count: i64 = if unfiltered {
            sqlx::query_scalar("SELECT total_jobs FROM users WHERE id = ?1")
                .bind(&author)
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(0)
        } else {
            let count_sql = format!(
                "SELECT count(*) FROM jobs j JOIN programs p ON p.id = j.program_id WHERE {conditions}"
            );
            sqlx::query_scalar(AssertSqlSafe(count_sql))
                .bind(&author)
                .bind(&filter.function)
                .bind(status)
                .bind(&created_after)
                .bind(filter.catalog)
                .fetch_one(&self.pool)
                .await?
        };
        let rows = rows
            .iter()
            .map(|r| {
                Ok(JobListRow {
                    id: uuid_of(r, "id")?,
                    status: status_of(r, "status")?,
                    sub_status: r.try_get("sub_status")?,
                    created: ts_of(r, "created")?,
                    program_id: uuid_of(r, "program_id")?,
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
            "UPDATE jobs SET result = ?3, updated = ?4 WHERE id = ?1 AND author_id = ?2",
        )
        .bind(uid(id))
        .bind(uid(author_id))
        .bind(result)
        .bind(now())
        .execute(&self.writer)
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
        let mut tx = self.write_tx().await?;
        let row =
            sqlx::query("SELECT status, sub_status FROM jobs WHERE id = ?1 AND author_id = ?2")
                .bind(uid(id))
                .bind(uid(author_id))
                .fetch_optional(&mut *tx)
                .await?;
        let Some(row) = row else {
            return tx.rollback_with(SubStatusOutcome::NotFound).await;
        };
        let status = status_of(&row, "status")?;
        if status.is_terminal() {
            return tx.rollback_with(SubStatusOutcome::NotActive(status)).await;
        }
        let previous: Option<String> = row.try_get("sub_status")?;
        if previous.as_deref() != Some(sub) {
            let at = now();
            sqlx::query("UPDATE jobs SET sub_status = ?2, updated = ?3 WHERE id = ?1")
                .bind(uid(id))
                .bind(sub)
                .bind(&at)
                .execute(&mut *tx)
                .await?;
            let data = json!({ "sub_status": sub });
            event(
                &mut tx,
                id,
                "SUB_STATUS_CHANGE",
                EventOrigin::Api,
                EventContext::SetSubStatus,
                data,
                &at,
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
        let mut tx = self.write_tx().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?1 AND author_id = ?2")
                .bind(uid(id))
                .bind(uid(author_id))
                .fetch_optional(&mut *tx)
                .await?;
        let Some(status) = status else {
            return tx.rollback_with(None).await;
        };
        if parse_status(&status)?.is_terminal() {
            return tx.rollback_with(Some(false)).await;
        }
        event(
            &mut tx,
            id,
            "ERROR",
            EventOrigin::Api,
            EventContext::SendError,
            data,
            &now(),
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
        let owned: Option<String> =
            sqlx::query_scalar("SELECT id FROM jobs WHERE id = ?1 AND author_id = ?2")
                .bind(uid(id))
                .bind(uid(author_id))
                .fetch_optional(&self.pool)
                .await?;
        if owned.is_none() {
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT event_type, origin, context, data, created FROM job_events \
             WHERE job_id = ?1 AND (?2 IS NULL OR event_type = ?2) ORDER BY id DESC",
        )
        .bind(uid(id))
        .bind(event_type)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JobEvent {
                    event_type: r.try_get("event_type")?,
                    origin: r.try_get("origin")?,
                    context: r.try_get("context")?,
                    data: json_of(r, "data")?,
                    created: ts_of(r, "created")?,
                })
            })
            .collect::<StorageResult<Vec<_>>>()
            .map(Some)
    }

    /// A user's stop. A QUEUED job never reached Ray, so it is final at once;
    /// a PENDING/RUNNING one is finalized by its tracker, which stops it on
    /// Ray and keeps its logs.
    pub async fn stop_job(&self, author_id: Uuid, id: Uuid) -> StorageResult<StopOutcome> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT status, ray_host FROM jobs WHERE id = ?1 AND author_id = ?2")
            .bind(uid(id))
            .bind(uid(author_id))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return tx.rollback_with(StopOutcome::NotFound).await;
        };
        let was = status_of(&row, "status")?;
        if was.transition(JobStatus::Stopped).is_err() {
            return tx.rollback_with(StopOutcome::AlreadyTerminal).await;
        }
        let ray_host: Option<String> = row.try_get("ray_host")?;
        let at = now();
        sqlx::query(
            "UPDATE jobs SET status = 'STOPPED', sub_status = NULL, status_reason = 'Stopped by the user.', \
                 finalized = NOT ray_submitted, env_sealed = CASE WHEN ray_submitted THEN env_sealed END, \
                 updated = ?2 WHERE id = ?1",
        )
        .bind(uid(id))
        .bind(&at)
        .execute(&mut *tx)
        .await?;
        ended(
            &mut tx,
            &uid(author_id),
            id,
            JobStatus::Stopped,
            EventOrigin::Api,
            EventContext::StopJob,
            &at,
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
        let mut tx = self.write_tx().await?;
        let now = now();
        let claimed = sqlx::query(
            "UPDATE jobs SET claimed_by = ?2, claim_until = ?3, dispatch_attempts = dispatch_attempts + 1 \
             WHERE id = ?1 AND status = 'QUEUED' AND (claimed_by IS NULL OR claim_until < ?4)",
        )
        .bind(uid(id))
        .bind(worker)
        .bind(now_plus(ttl))
        .bind(&now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            return tx.rollback_with(None).await;
        }
        let r = sqlx::query(
            "SELECT j.id, j.author_id, u.username, p.title, p.provider, p.entrypoint, p.artifact_sha256, \
                 j.arguments, j.env_sealed, p.env_vars_sealed, j.pip, j.dispatch_attempts \
             FROM jobs j JOIN users u ON u.id = j.author_id JOIN programs p ON p.id = j.program_id \
             WHERE j.id = ?1",
        )
        .bind(uid(id))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let pip = json_of(&r, "pip")?;
        Ok(Some(DispatchJob {
            id: uuid_of(&r, "id")?,
            author_id: uuid_of(&r, "author_id")?,
            username: r.try_get("username")?,
            program_title: r.try_get("title")?,
            provider: r.try_get("provider")?,
            entrypoint: r.try_get("entrypoint")?,
            artifact_sha256: r.try_get("artifact_sha256")?,
            arguments: r.try_get("arguments")?,
            env_sealed: r.try_get("env_sealed")?,
            program_env_sealed: r.try_get("env_vars_sealed")?,
            pip: serde_json::from_value(pip).map_err(|e| corrupt("jobs.pip", e))?,
            dispatch_attempts: r.try_get("dispatch_attempts")?,
        }))
    }

    /// Extends this worker's claim; false when it lost it (stopped, or taken over).
    pub async fn renew_claim(&self, id: Uuid, worker: &str, ttl: Duration) -> StorageResult<bool> {
        let n = sqlx::query("UPDATE jobs SET claim_until = ?3 WHERE id = ?1 AND claimed_by = ?2 AND status = 'QUEUED'")
            .bind(uid(id))
            .bind(worker)
            .bind(now_plus(ttl))
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Gives the claim back without dispatching (no slot, or a transient error).
    pub async fn release_claim(&self, id: Uuid, worker: &str) -> StorageResult<()> {
        sqlx::query("UPDATE jobs SET claimed_by = NULL, claim_until = NULL WHERE id = ?1 AND claimed_by = ?2")
            .bind(uid(id))
            .bind(worker)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn job_status(&self, id: Uuid) -> StorageResult<Option<JobStatus>> {
        let s: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?1")
            .bind(uid(id))
            .fetch_optional(&self.pool)
            .await?;
        s.as_deref().map(parse_status).transpose()
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
        let mut tx = self.write_tx().await?;
        let at = now();
        let author: Option<String> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'PENDING', ray_host = ?3, ray_submitted = 1, claimed_by = NULL, \
                 claim_until = NULL, updated = ?4 \
             WHERE id = ?1 AND status = 'QUEUED' AND claimed_by = ?2 RETURNING author_id",
        )
        .bind(uid(id))
        .bind(worker)
        .bind(ray_host)
        .bind(&at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(author) = author else {
            return tx.rollback_with(false).await;
        };
        sqlx::query("UPDATE users SET last_dispatched_at = ?2 WHERE id = ?1")
            .bind(author)
            .bind(&at)
            .execute(&mut *tx)
            .await?;
        status_event(
            &mut tx,
            id,
            JobStatus::Pending,
            EventOrigin::Scheduler,
            EventContext::ScheduleJobs,
            &at,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// A job stopped by its user while a worker was submitting it: Ray may
    /// hold it, so hand it to the tracker, which stops it there and keeps logs.
    pub async fn mark_submitted_after_stop(&self, id: Uuid, ray_host: &str) -> StorageResult<()> {
        sqlx::query(
            "UPDATE jobs SET ray_submitted = 1, finalized = 0, ray_host = ?2, claimed_by = NULL, \
                 claim_until = NULL, updated = ?3 WHERE id = ?1",
        )
        .bind(uid(id))
        .bind(ray_host)
        .bind(now())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// QUEUED → FAILED for a job that can never be submitted.
    pub async fn fail_queued(&self, id: Uuid, reason: &str) -> StorageResult<bool> {
        assert_legal(&[JobStatus::Queued], JobStatus::Failed)?;
        let mut tx = self.write_tx().await?;
        let at = now();
        let author: Option<String> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'FAILED', status_reason = ?2, logs = ?2, finalized = 1, env_sealed = NULL, \
                 claimed_by = NULL, claim_until = NULL, sub_status = NULL, updated = ?3 \
             WHERE id = ?1 AND status = 'QUEUED' RETURNING author_id",
        )
        .bind(uid(id))
        .bind(reason)
        .bind(&at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(author) = author else {
            return tx.rollback_with(false).await;
        };
        ended(
            &mut tx,
            &author,
            id,
            JobStatus::Failed,
            EventOrigin::Scheduler,
            EventContext::ScheduleJobs,
            &at,
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
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query(
            "SELECT j.id, u.username, j.status, j.ray_host, p.title, p.provider \
             FROM jobs j JOIN users u ON u.id = j.author_id JOIN programs p ON p.id = j.program_id \
             WHERE j.ray_submitted AND NOT j.finalized \
               AND (j.tracked_by IS NULL OR j.tracked_by = ?1 OR j.track_until < ?2) \
             ORDER BY j.created LIMIT ?3",
        )
        .bind(worker)
        .bind(now())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let jobs = rows
            .iter()
            .map(|r| {
                Ok(TrackedJob {
                    id: uuid_of(r, "id")?,
                    username: r.try_get("username")?,
                    status: status_of(r, "status")?,
                    ray_host: r
                        .try_get::<Option<String>, _>("ray_host")?
                        .unwrap_or_default(),
                    program_title: r.try_get("title")?,
                    provider: r.try_get("provider")?,
                })
            })
            .collect::<StorageResult<Vec<_>>>()?;
        if jobs.is_empty() {
            return tx.rollback_with(jobs).await;
        }
        let ids = Value::from(jobs.iter().map(|j| uid(j.id)).collect::<Vec<_>>()).to_string();
        sqlx::query("UPDATE jobs SET tracked_by = ?1, track_until = ?2 WHERE id IN (SELECT value FROM json_each(?3))")
            .bind(worker)
            .bind(now_plus(ttl))
            .bind(ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(jobs)
    }

    /// PENDING → RUNNING as Ray reports it.
    pub async fn mark_running(
        &self,
        id: Uuid,
        ray_start: Option<DateTime<Utc>>,
    ) -> StorageResult<bool> {
        assert_legal(&[JobStatus::Pending], JobStatus::Running)?;
        let mut tx = self.write_tx().await?;
        let at = now();
        let n = sqlx::query(
            "UPDATE jobs SET status = 'RUNNING', ray_start = COALESCE(?2, ray_start), updated = ?3 \
             WHERE id = ?1 AND status = 'PENDING'",
        )
        .bind(uid(id))
        .bind(ray_start.map(ts))
        .bind(&at)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return tx.rollback_with(false).await;
        }
        status_event(
            &mut tx,
            id,
            JobStatus::Running,
            EventOrigin::Scheduler,
            EventContext::UpdateJobStatus,
            &at,
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
        let mut tx = self.write_tx().await?;
        let row = sqlx::query("SELECT status, author_id FROM jobs WHERE id = ?1 AND NOT finalized")
            .bind(uid(id))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return tx.rollback_with(None).await;
        };
        let current = status_of(&row, "status")?;
        let author: String = row.try_get("author_id")?;
        let moves = !current.is_terminal();
        if moves {
            // Only a submitted (PENDING/RUNNING) job can end here.
            current
                .transition(fin.status)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        }
        let final_status = if moves { fin.status } else { current };
        let at = now();
        sqlx::query(
            "UPDATE jobs SET status = ?2, status_reason = COALESCE(status_reason, ?3), logs = ?4, \
                 result = COALESCE(result, ?5), ray_start = COALESCE(?6, ray_start), ray_end = COALESCE(?7, ray_end), \
                 sub_status = NULL, env_sealed = NULL, finalized = 1, tracked_by = NULL, track_until = NULL, \
                 updated = ?8 WHERE id = ?1",
        )
        .bind(uid(id))
        .bind(final_status.as_str())
        .bind(&fin.reason)
        .bind(&fin.logs)
        .bind(&fin.result_from_file)
        .bind(fin.ray_start.map(ts))
        .bind(fin.ray_end.map(ts))
        .bind(&at)
        .execute(&mut *tx)
        .await?;
        if moves {
            ended(
                &mut tx,
                &author,
                id,
                final_status,
                EventOrigin::Scheduler,
                EventContext::UpdateJobStatus,
                &at,
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
        // Postgres' `CROSS JOIN LATERAL (... LIMIT 1)` as a correlated
        // scalar subquery: users without such a job get NULL and drop out in
        // the join. The stale filter applies to that oldest job, as there.
        let rows = sqlx::query(
            "SELECT q.id FROM ( \
                 SELECT u.last_dispatched_at, ( \
                     SELECT j.id FROM jobs j \
                     WHERE j.author_id = u.id AND j.status = 'QUEUED' \
                       AND (j.claimed_by IS NULL OR j.claim_until < ?2) \
                     ORDER BY j.created LIMIT 1) AS job_id \
                 FROM users u \
                 WHERE u.active_jobs > 0 \
                   AND (SELECT count(*) FROM jobs r \
                        WHERE r.author_id = u.id AND r.status IN ('PENDING', 'RUNNING')) < ?1) c \
             JOIN jobs q ON q.id = c.job_id \
             WHERE (?3 IS NULL OR q.enqueued_at IS NULL OR q.enqueued_at < ?3) \
             ORDER BY c.last_dispatched_at ASC NULLS FIRST LIMIT ?4",
        )
        .bind(i64::from(jobs_per_user))
        .bind(now())
        .bind(stale.map(now_minus))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Candidate {
                    job_id: uuid_of(r, "id")?,
                })
            })
            .collect()
    }

    pub async fn setting(&self, key: &str) -> StorageResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = ?1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Stores the value unless the key has one already.
    pub async fn insert_setting(&self, key: &str, value: &[u8]) -> StorageResult<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Ended Ray jobs still held by Ray `older_than` after they ended.
    pub async fn ray_jobs_to_forget(
        &self,
        older_than: Duration,
        limit: i64,
    ) -> StorageResult<Vec<(Uuid, String)>> {
        let rows = sqlx::query(
            "SELECT id, ray_host FROM jobs WHERE finalized = 1 AND ray_submitted = 1 AND ray_forgotten = 0 \
               AND ray_host IS NOT NULL AND ray_host <> 'local' AND updated < ?1 ORDER BY updated LIMIT ?2",
        )
        .bind(now_minus(older_than))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((uuid_of(r, "id")?, r.try_get("ray_host")?)))
            .collect()
    }

    pub async fn mark_ray_forgotten(&self, id: Uuid) -> StorageResult<()> {
        sqlx::query("UPDATE jobs SET ray_forgotten = 1 WHERE id = ?1")
            .bind(uid(id))
            .execute(&self.writer)
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
            .map(|r| Ok((uuid_of(r, "id")?, r.try_get("username")?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_fixed_width_so_text_order_is_time_order() {
        let whole = DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .to_utc();
        let later = whole + chrono::Duration::nanoseconds(123_456_789);
        assert_eq!(ts(whole), "2026-12-03T10:00:00.000000Z");
        assert_eq!(ts(later), "2026-12-03T10:00:00.123456Z");
        assert!(ts(whole) < ts(later));
        assert_eq!(
            parse_ts("t", &ts(later)).unwrap(),
            later - chrono::Duration::nanoseconds(789)
        );
        assert_eq!(ts(DateTime::<Utc>::MAX_UTC), "9999-12-31T23:59:59.999999Z");
        assert_eq!(ts(DateTime::<Utc>::MIN_UTC), "0001-01-01T00:00:00.000000Z");
        assert_eq!(now_plus(Duration::MAX), "9999-12-31T23:59:59.999999Z");
        assert_eq!(now().len(), 27);
    }
}
