//! Persistent state: users, programs (functions), jobs, job events.
//!
//! The row types here are what the API and the workers see; the SQL lives in
//! one module per backend.

pub mod postgres;
pub mod sqlite;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::JobStatus;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

impl StorageError {
    /// True when the database could not be reached at all (as opposed to a
    /// statement failing), so callers can answer 503 rather than 500.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StorageError::Db(
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
            )
        )
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

#[derive(Debug, Clone)]
pub struct User {
    pub id: Uuid,
    pub username: String,
}

/// A function as stored.
#[derive(Debug, Clone)]
pub struct Program {
    pub id: Uuid,
    pub author_id: Uuid,
    pub title: String,
    pub provider: Option<String>,
    pub entrypoint: String,
    pub artifact_sha256: Option<String>,
    pub artifact_name: Option<String>,
    pub dependencies: Value,
    pub env_vars_sealed: Option<Vec<u8>>,
    pub description: String,
    pub documentation_url: Option<String>,
    pub program_type: String,
    pub version: Option<String>,
    pub runner: String,
    pub arguments_schema: String,
    pub created: DateTime<Utc>,
}

/// What an upload writes. `None` fields keep the stored value on update.
#[derive(Debug, Clone, Default)]
pub struct ProgramUpsert {
    pub title: String,
    pub entrypoint: Option<String>,
    pub artifact: Option<(String, String)>, // (sha256, file name)
    pub dependencies: Option<Value>,
    pub env_vars_sealed: Option<Vec<u8>>,
    pub description: Option<String>,
    pub program_type: Option<String>,
    pub version: Option<String>,
    pub arguments_schema: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: Uuid,
    pub author_id: Uuid,
    pub program_id: Uuid,
    pub status: JobStatus,
    pub sub_status: Option<String>,
    pub arguments: String,
    pub result: Option<String>,
    pub logs: Option<String>,
    pub status_reason: Option<String>,
    pub ray_host: Option<String>,
    pub ray_submitted: bool,
    pub ray_start: Option<DateTime<Utc>>,
    pub ray_end: Option<DateTime<Utc>>,
    pub finalized: bool,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
}

/// A job with the program fields the API shows beside it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub job: Job,
    pub program: Program,
}

/// One row of the job list.
#[derive(Debug, Clone)]
pub struct JobListRow {
    pub id: Uuid,
    pub status: JobStatus,
    pub sub_status: Option<String>,
    pub created: DateTime<Utc>,
    pub program_id: Uuid,
    pub program_title: String,
    pub program_provider: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub function: Option<String>,
    pub status: Option<JobStatus>,
    pub created_after: Option<DateTime<Utc>>,
    /// `Some(true)`: only provider functions; `Some(false)`: only own.
    pub catalog: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct JobEvent {
    pub event_type: String,
    pub origin: String,
    pub context: String,
    pub data: Value,
    pub created: DateTime<Utc>,
}

/// A new job as `programs/run` creates it.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub author_id: Uuid,
    pub program_id: Uuid,
    pub arguments: String,
    pub config: Option<Value>,
    pub env_sealed: Vec<u8>,
    pub pip: Vec<String>,
}

// Results of one call, never stored in bulk: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum CreateJob {
    Created(Job),
    /// The user already has `LIMITS_ACTIVE_JOBS_PER_USER` active jobs.
    LimitReached,
}

#[derive(Debug)]
pub enum StopOutcome {
    /// The job was active and is STOPPED now; `was` tells whether Ray may
    /// hold it.
    Stopped {
        was: JobStatus,
        ray_host: Option<String>,
    },
    AlreadyTerminal,
    NotFound,
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum SubStatusOutcome {
    Updated(JobView),
    NotActive(JobStatus),
    NotFound,
}

/// Everything a worker needs to submit a job, read in one query.
#[derive(Debug, Clone)]
pub struct DispatchJob {
    pub id: Uuid,
    pub author_id: Uuid,
    pub username: String,
    pub program_title: String,
    pub provider: Option<String>,
    pub entrypoint: String,
    pub artifact_sha256: Option<String>,
    pub arguments: String,
    pub env_sealed: Option<Vec<u8>>,
    pub program_env_sealed: Option<Vec<u8>>,
    pub pip: Vec<String>,
    pub dispatch_attempts: i32,
}

/// A submitted job a worker follows on Ray.
#[derive(Debug, Clone)]
pub struct TrackedJob {
    pub id: Uuid,
    pub username: String,
    pub status: JobStatus,
    pub ray_host: String,
    pub program_title: String,
    pub provider: Option<String>,
}

/// The end of a job as the tracker records it, in one transaction.
#[derive(Debug, Clone)]
pub struct Finish {
    /// The status to move to; ignored when the job is already terminal
    /// (a user stop), in which case only logs and result are stored.
    pub status: JobStatus,
    pub reason: Option<String>,
    pub logs: Option<String>,
    pub result_from_file: Option<String>,
    pub ray_start: Option<DateTime<Utc>>,
    pub ray_end: Option<DateTime<Utc>>,
}

/// A job for which a queue wake-up should be pushed.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub job_id: Uuid,
}

/// The storage the gateway runs on: Postgres (distributed) or SQLite
/// (embedded). Both backends offer the same operations with the same
/// semantics; `shared/tests/storage_conformance.rs` runs one suite on both.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

/// Forwards each operation to the backend.
macro_rules! forward {
    ($( $(#[$meta:meta])* pub async fn $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $(
                $(#[$meta])*
                pub async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match self {
                        Store::Postgres(s) => s.$name($($arg),*).await,
                        Store::Sqlite(s) => s.$name($($arg),*).await,
                    }
                }
            )*
        }
    };
}

forward! {
    /// Applies the backend's migrations (safe with concurrent starters).
    pub async fn migrate(&self) -> StorageResult<()>;
    /// True once every migration this binary knows is applied.
    pub async fn schema_ready(&self) -> StorageResult<bool>;
    pub async fn ping(&self) -> StorageResult<()>;
    pub async fn ensure_user(&self, username: &str) -> StorageResult<User>;
    pub async fn put_artifact(&self, sha256: &str, data: &[u8]) -> StorageResult<()>;
    pub async fn artifact(&self, sha256: &str) -> StorageResult<Option<Vec<u8>>>;
    /// Creates or updates the author's function of that title.
    pub async fn upsert_program(&self, author_id: Uuid, p: &ProgramUpsert) -> StorageResult<Program>;
    pub async fn programs(&self, author_id: Uuid) -> StorageResult<Vec<Program>>;
    pub async fn program_by_title(&self, author_id: Uuid, title: &str) -> StorageResult<Option<Program>>;
    /// Inserts a QUEUED job unless the author is at `active_limit`, atomically.
    pub async fn create_job(&self, new: &NewJob, active_limit: u32) -> StorageResult<CreateJob>;
    pub async fn mark_enqueued(&self, ids: &[Uuid]) -> StorageResult<()>;
    pub async fn job(&self, author_id: Uuid, id: Uuid) -> StorageResult<Option<JobView>>;
    pub async fn list_jobs(&self, author_id: Uuid, filter: &JobFilter, limit: Option<i64>, offset: i64) -> StorageResult<(i64, Vec<JobListRow>)>;
    pub async fn save_posted_result(&self, author_id: Uuid, id: Uuid, result: &str) -> StorageResult<bool>;
    pub async fn set_sub_status(&self, author_id: Uuid, id: Uuid, sub: &str) -> StorageResult<SubStatusOutcome>;
    pub async fn add_error_event(&self, author_id: Uuid, id: Uuid, data: Value) -> StorageResult<Option<bool>>;
    pub async fn events(&self, author_id: Uuid, id: Uuid, event_type: Option<&str>) -> StorageResult<Option<Vec<JobEvent>>>;
    pub async fn stop_job(&self, author_id: Uuid, id: Uuid) -> StorageResult<StopOutcome>;
    pub async fn claim_for_dispatch(&self, id: Uuid, worker: &str, ttl: std::time::Duration) -> StorageResult<Option<DispatchJob>>;
    pub async fn renew_claim(&self, id: Uuid, worker: &str, ttl: std::time::Duration) -> StorageResult<bool>;
    pub async fn release_claim(&self, id: Uuid, worker: &str) -> StorageResult<()>;
    pub async fn job_status(&self, id: Uuid) -> StorageResult<Option<JobStatus>>;
    pub async fn mark_pending(&self, id: Uuid, worker: &str, ray_host: &str) -> StorageResult<bool>;
    pub async fn mark_submitted_after_stop(&self, id: Uuid, ray_host: &str) -> StorageResult<()>;
    pub async fn fail_queued(&self, id: Uuid, reason: &str) -> StorageResult<bool>;
    pub async fn claim_tracking(&self, worker: &str, ttl: std::time::Duration, limit: i64) -> StorageResult<Vec<TrackedJob>>;
    pub async fn mark_running(&self, id: Uuid, ray_start: Option<DateTime<Utc>>) -> StorageResult<bool>;
    /// Records the end of a submitted job in one transaction.
    pub async fn finish(&self, id: Uuid, fin: &Finish) -> StorageResult<Option<JobStatus>>;
    pub async fn dispatch_candidates(&self, jobs_per_user: u32, stale: Option<std::time::Duration>, limit: i64) -> StorageResult<Vec<Candidate>>;
    pub async fn running_jobs(&self) -> StorageResult<Vec<(Uuid, String)>>;
    /// Ended Ray jobs (id, Ray host) still held by Ray `older_than` after they ended.
    pub async fn ray_jobs_to_forget(&self, older_than: std::time::Duration, limit: i64) -> StorageResult<Vec<(Uuid, String)>>;
    pub async fn mark_ray_forgotten(&self, id: Uuid) -> StorageResult<()>;
    pub async fn setting(&self, key: &str) -> StorageResult<Option<Vec<u8>>>;
    /// Stores the value unless the key has one already.
    pub async fn insert_setting(&self, key: &str, value: &[u8]) -> StorageResult<()>;
}

const KEY_CHECK: &str = "secret_key_check";
const KEY_CHECK_PLAIN: &[u8] = b"qs-gateway: this deployment's GATEWAY_SECRET_KEY";

impl Store {
    /// Proves this process has the deployment's secret key: the first
    /// process seals a known value, every later one must open it. A process
    /// with another key would fail every job it touches, so it must not start.
    pub async fn check_secret_key(
        &self,
        secrets: &crate::secrets::SecretBox,
    ) -> Result<(), KeyCheckError> {
        if self.setting(KEY_CHECK).await?.is_none() {
            let sealed = secrets
                .seal(KEY_CHECK_PLAIN)
                .map_err(|_| KeyCheckError::Mismatch)?;
            self.insert_setting(KEY_CHECK, &sealed).await?;
        }
        // Read back: of two first starters, only one value was kept.
        let stored = self
            .setting(KEY_CHECK)
            .await?
            .ok_or(KeyCheckError::Mismatch)?;
        match secrets.open(&stored) {
            Ok(plain) if plain == KEY_CHECK_PLAIN => Ok(()),
            _ => Err(KeyCheckError::Mismatch),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    #[error(
        "GATEWAY_SECRET_KEY is not the key this database was set up with: every API and worker process needs the same key (jobs queued under another key cannot be opened)"
    )]
    Mismatch,
    #[error(transparent)]
    Storage(#[from] StorageError),
}
