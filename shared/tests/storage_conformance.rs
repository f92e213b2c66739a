//! One conformance suite for both storage backends (DESIGN.md §7): every case
//! is written once as an `async fn(&Store)` in `cases` and run against
//! Postgres and SQLite by the `conformance!` macro at the bottom.
//!
//! Postgres: a fresh database per test, created from
//! `GATEWAY_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and dropped at the end, also when the case fails. SQLite: a file in a
//! temporary directory per test.

use std::str::FromStr;

use shared::storage::{PgStore, SqliteStore, Store};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use uuid::Uuid;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

enum Cleanup {
    Postgres {
        admin: Box<PgConnectOptions>,
        database: String,
    },
    Sqlite(tempfile::TempDir),
}

/// A store on a fresh, migrated database, and what removes it afterwards.
struct Harness {
    store: Store,
    cleanup: Cleanup,
}

impl Harness {
    async fn postgres() -> Harness {
        let url = std::env::var("GATEWAY_TEST_DATABASE_URL")
            .unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
        let admin = PgConnectOptions::from_str(&url)
            .expect("GATEWAY_TEST_DATABASE_URL is not a Postgres URL");
        let database = format!("gw_conformance_{}", Uuid::new_v4().simple());
        let mut conn = admin
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot reach Postgres at {url}: {e}"));
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(admin.clone().database(&database))
            .await
            .unwrap();
        let harness = Harness {
            store: Store::Postgres(PgStore::from_pool(pool)),
            cleanup: Cleanup::Postgres {
                admin: Box::new(admin),
                database,
            },
        };
        harness.prepare().await;
        harness
    }

    async fn sqlite() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        // A directory that does not exist yet: `connect` creates it and the file.
        let store = SqliteStore::connect(&dir.path().join("data").join("gateway.sqlite3"))
            .await
            .unwrap();
        let harness = Harness {
            store: Store::Sqlite(store),
            cleanup: Cleanup::Sqlite(dir),
        };
        harness.prepare().await;
        harness
    }

    /// Migrates the empty database with two concurrent starters.
    async fn prepare(&self) {
        assert!(
            !self.store.schema_ready().await.unwrap(),
            "a fresh database has no schema"
        );
        let (a, b) = tokio::join!(self.store.migrate(), self.store.migrate());
        a.unwrap();
        b.unwrap();
        assert!(self.store.schema_ready().await.unwrap());
    }

    async fn teardown(self) {
        match (&self.store, self.cleanup) {
            (Store::Postgres(pg), Cleanup::Postgres { admin, database }) => {
                pg.pool().close().await;
                let mut conn = admin.connect().await.unwrap();
                sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .unwrap();
                conn.close().await.unwrap();
            }
            (Store::Sqlite(lite), Cleanup::Sqlite(dir)) => {
                lite.pool().close().await;
                drop(dir);
            }
            _ => unreachable!("harness store and cleanup disagree"),
        }
    }
}

/// Runs one case on a fresh harness, tearing it down even when the case panics.
macro_rules! run_case {
    ($harness:expr, $case:path) => {{
        let harness = $harness.await;
        let case = ::std::panic::AssertUnwindSafe($case(&harness.store));
        let outcome = ::futures::FutureExt::catch_unwind(case).await;
        harness.teardown().await;
        if let Err(panic) = outcome {
            ::std::panic::resume_unwind(panic);
        }
    }};
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    run_case!(super::Harness::postgres(), super::cases::$case)
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    run_case!(super::Harness::sqlite(), super::cases::$case)
                }
            )*
        }
    };
}

conformance! {
    schema_and_health,
    user_upsert_idempotent,
    artifacts_round_trip,
    program_upsert_keeps_unspecified_fields,
    status_transitions_are_compare_and_set,
    active_limit_counter,
    active_limit_is_atomic_under_concurrency,
    pagination_and_filters,
    per_user_isolation,
    concurrent_claims_never_double_dispatch,
    claims_expire,
    tracking_leases,
    dispatch_candidates_one_per_user,
    dispatch_candidates_fair_order,
    dispatch_candidates_stale_filter,
    stop_job_outcomes,
    stop_racing_dispatch,
    running_jobs_lists_submitted_active_jobs,
}

mod cases {
    use std::collections::HashSet;
    use std::time::Duration;

    use chrono::{DateTime, TimeZone, Utc};
    use serde_json::json;
    use shared::domain::JobStatus::{self, *};
    use shared::storage::*;
    use uuid::Uuid;

    const TTL: Duration = Duration::from_secs(30);
    const RAY: &str = "http://ray-head:8265";
    const SETUP_WORKER: &str = "setup-worker";

    // ---- helpers -----------------------------------------------------------

    async fn user(s: &Store, name: &str) -> User {
        s.ensure_user(name).await.unwrap()
    }

    async fn program(s: &Store, author: Uuid, title: &str) -> Program {
        s.upsert_program(
            author,
            &ProgramUpsert {
                title: title.to_string(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
    }

    fn new_job(author: Uuid, program: Uuid) -> NewJob {
        NewJob {
            id: Uuid::new_v4(),
            author_id: author,
            program_id: program,
            arguments: r#"{"shots": 1024}"#.to_string(),
            config: Some(json!({ "workers": 1 })),
            env_sealed: vec![1, 2, 3],
            pip: vec!["numpy==2.0".to_string()],
        }
    }

    async fn create(s: &Store, new: &NewJob, limit: u32) -> Option<Job> {
        match s.create_job(new, limit).await.unwrap() {
            CreateJob::Created(job) => Some(job),
            CreateJob::LimitReached => None,
        }
    }

    async fn queued(s: &Store, author: Uuid, program: Uuid) -> Job {
        create(s, &new_job(author, program), 1000)
            .await
            .expect("below the limit")
    }

    /// Claims and submits a QUEUED job.
    async fn dispatch(s: &Store, id: Uuid) {
        assert!(
            s.claim_for_dispatch(id, SETUP_WORKER, TTL)
                .await
                .unwrap()
                .is_some()
        );
        assert!(s.mark_pending(id, SETUP_WORKER, RAY).await.unwrap());
    }

    async fn pending(s: &Store, author: Uuid, program: Uuid) -> Job {
        let job = queued(s, author, program).await;
        dispatch(s, job.id).await;
        job
    }

    async fn running(s: &Store, author: Uuid, program: Uuid) -> Job {
        let job = pending(s, author, program).await;
        assert!(s.mark_running(job.id, None).await.unwrap());
        job
    }

    fn fin(status: JobStatus, logs: &str) -> Finish {
        Finish {
            status,
            reason: None,
            logs: Some(logs.to_string()),
            result_from_file: None,
            ray_start: None,
            ray_end: None,
        }
    }

    async fn view(s: &Store, author: Uuid, id: Uuid) -> Job {
        s.job(author, id)
            .await
            .unwrap()
            .expect("the author's job")
            .job
    }

    /// The statuses of the job's STATUS_CHANGE events, newest first.
    async fn moves(s: &Store, author: Uuid, id: Uuid) -> Vec<String> {
        s.events(author, id, Some("STATUS_CHANGE"))
            .await
            .unwrap()
            .expect("the author's job")
            .into_iter()
            .map(|e| {
                e.data["status"]
                    .as_str()
                    .expect("status in the event")
                    .to_string()
            })
            .collect()
    }

    fn micros(us: i64) -> DateTime<Utc> {
        Utc.timestamp_micros(us).unwrap()
    }

    fn assert_recent(t: DateTime<Utc>) {
        let age = Utc::now().signed_duration_since(t);
        assert!(
            age.num_seconds().abs() < 60,
            "timestamp {t} is not about now"
        );
    }

    fn tracked(t: &[TrackedJob]) -> HashSet<(Uuid, JobStatus)> {
        t.iter().map(|t| (t.id, t.status)).collect()
    }

    fn ids(c: &[Candidate]) -> Vec<Uuid> {
        c.iter().map(|c| c.job_id).collect()
    }

    fn id_set(c: &[Candidate]) -> HashSet<Uuid> {
        c.iter().map(|c| c.job_id).collect()
    }

    async fn tick() {
        // Distinct creation times, so "newest first" is deterministic.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }

    // ---- cases -------------------------------------------------------------

    pub async fn schema_and_health(s: &Store) {
        s.ping().await.unwrap();
        s.migrate().await.unwrap();
        assert!(s.schema_ready().await.unwrap());
    }

    pub async fn user_upsert_idempotent(s: &Store) {
        let a1 = user(s, "alice").await;
        let a2 = user(s, "alice").await;
        assert_eq!(a1.id, a2.id);
        assert_eq!(a2.username, "alice");
        let b = user(s, "bob").await;
        assert_ne!(a1.id, b.id);

        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.ensure_user("carol").await.unwrap().id })
            })
            .collect();
        let mut carol = HashSet::new();
        for t in tasks {
            carol.insert(t.await.unwrap());
        }
        assert_eq!(
            carol.len(),
            1,
            "concurrent upserts of one name give one user"
        );
        assert_eq!(user(s, "carol").await.id, *carol.iter().next().unwrap());
    }

    pub async fn artifacts_round_trip(s: &Store) {
        let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        s.put_artifact("sha-a", &data).await.unwrap();
        s.put_artifact("sha-a", b"other bytes").await.unwrap(); // content-addressed: first write stays
        assert_eq!(s.artifact("sha-a").await.unwrap(), Some(data));
        assert_eq!(s.artifact("sha-missing").await.unwrap(), None);
    }

    pub async fn program_upsert_keeps_unspecified_fields(s: &Store) {
        let alice = user(s, "alice").await;
        let bob = user(s, "bob").await;
        s.put_artifact("sha-1", b"one").await.unwrap();
        s.put_artifact("sha-2", b"two").await.unwrap();
        let full = ProgramUpsert {
            title: "fn".into(),
            entrypoint: Some("run.py".into()),
            artifact: Some(("sha-1".into(), "fn.tar".into())),
            dependencies: Some(json!(["qiskit==1.0", "numpy"])),
            env_vars_sealed: Some(vec![9, 8, 7]),
            description: Some("first".into()),
            program_type: Some("APPLICATION".into()),
            version: Some("1.0.0".into()),
            arguments_schema: Some(r#"{"type":"object"}"#.into()),
        };
        let p1 = s.upsert_program(alice.id, &full).await.unwrap();
        assert_eq!(p1.author_id, alice.id);
        assert_eq!(p1.title, "fn");
        assert_eq!(p1.entrypoint, "run.py");
        assert_eq!(p1.artifact_sha256.as_deref(), Some("sha-1"));
        assert_eq!(p1.artifact_name.as_deref(), Some("fn.tar"));
        assert_eq!(p1.dependencies, json!(["qiskit==1.0", "numpy"]));
        assert_eq!(p1.env_vars_sealed, Some(vec![9, 8, 7]));
        assert_eq!(p1.description, "first");
        assert_eq!(p1.program_type, "APPLICATION");
        assert_eq!(p1.version.as_deref(), Some("1.0.0"));
        assert_eq!(p1.arguments_schema, r#"{"type":"object"}"#);
        assert_eq!(p1.provider, None);
        assert_eq!(p1.documentation_url, None);
        assert_eq!(p1.runner, "ray");
        assert_recent(p1.created);

        // Only the description given: everything else is kept.
        let p2 = s
            .upsert_program(
                alice.id,
                &ProgramUpsert {
                    title: "fn".into(),
                    description: Some("second".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(p2.id, p1.id);
        assert_eq!(p2.created, p1.created);
        assert_eq!(p2.description, "second");
        assert_eq!(p2.entrypoint, p1.entrypoint);
        assert_eq!(p2.artifact_sha256, p1.artifact_sha256);
        assert_eq!(p2.artifact_name, p1.artifact_name);
        assert_eq!(p2.dependencies, p1.dependencies);
        assert_eq!(p2.env_vars_sealed, p1.env_vars_sealed);
        assert_eq!(p2.program_type, p1.program_type);
        assert_eq!(p2.version, p1.version);
        assert_eq!(p2.arguments_schema, p1.arguments_schema);

        let p3 = s
            .upsert_program(
                alice.id,
                &ProgramUpsert {
                    title: "fn".into(),
                    artifact: Some(("sha-2".into(), "fn2.tar".into())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(p3.id, p1.id);
        assert_eq!(p3.artifact_sha256.as_deref(), Some("sha-2"));
        assert_eq!(p3.artifact_name.as_deref(), Some("fn2.tar"));
        assert_eq!(p3.entrypoint, "run.py");
        assert_eq!(p3.description, "second");

        tick().await;
        // Defaults on create.
        let bare = program(s, alice.id, "bare").await;
        assert_ne!(bare.id, p1.id);
        assert_eq!(bare.entrypoint, "main.py");
        assert_eq!(bare.dependencies, json!([]));
        assert_eq!(bare.description, "");
        assert_eq!(bare.program_type, "GENERIC");
        assert_eq!(bare.version, None);
        assert_eq!(bare.arguments_schema, "{}");
        assert_eq!(bare.env_vars_sealed, None);
        assert_eq!(bare.artifact_sha256, None);

        let listed: Vec<String> = s
            .programs(alice.id)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.title)
            .collect();
        assert_eq!(listed, ["bare", "fn"], "newest first");
        let found = s
            .program_by_title(alice.id, "fn")
            .await
            .unwrap()
            .expect("alice's fn");
        assert_eq!(found.id, p1.id);
        assert_eq!(found.description, "second");
        assert!(
            s.program_by_title(alice.id, "nope")
                .await
                .unwrap()
                .is_none()
        );

        // Titles are per author.
        assert!(s.program_by_title(bob.id, "fn").await.unwrap().is_none());
        assert!(s.programs(bob.id).await.unwrap().is_empty());
        let bobs = program(s, bob.id, "fn").await;
        assert_ne!(bobs.id, p1.id);
        assert_eq!(
            s.program_by_title(alice.id, "fn")
                .await
                .unwrap()
                .unwrap()
                .description,
            "second"
        );
    }

    pub async fn status_transitions_are_compare_and_set(s: &Store) {
        let u = user(s, "alice").await;
        let p = program(s, u.id, "fn").await;

        let j = queued(s, u.id, p.id).await;
        assert_eq!(j.status, Queued);
        assert!(!j.finalized && !j.ray_submitted);
        assert_eq!(j.arguments, r#"{"shots": 1024}"#);
        assert_recent(j.created);
        assert_eq!(s.job_status(j.id).await.unwrap(), Some(Queued));
        assert_eq!(s.job_status(Uuid::new_v4()).await.unwrap(), None);
        assert_eq!(moves(s, u.id, j.id).await, ["QUEUED"]);

        // QUEUED → PENDING only by the claimer.
        assert!(!s.mark_pending(j.id, "w1", RAY).await.unwrap(), "no claim");
        assert!(
            s.claim_for_dispatch(j.id, "w1", TTL)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            !s.mark_pending(j.id, "w2", RAY).await.unwrap(),
            "not the claimer"
        );
        assert!(
            !s.mark_running(j.id, None).await.unwrap(),
            "RUNNING only from PENDING"
        );
        assert!(s.mark_pending(j.id, "w1", RAY).await.unwrap());
        assert!(
            !s.mark_pending(j.id, "w1", RAY).await.unwrap(),
            "not QUEUED any more"
        );
        assert!(
            !s.fail_queued(j.id, "late").await.unwrap(),
            "fail_queued only from QUEUED"
        );
        let v = view(s, u.id, j.id).await;
        assert_eq!(v.status, Pending);
        assert_eq!(v.ray_host.as_deref(), Some(RAY));
        assert!(v.ray_submitted && !v.finalized);

        // PENDING → RUNNING once.
        let start = micros(1_767_225_600_123_456);
        assert!(s.mark_running(j.id, Some(start)).await.unwrap());
        assert!(!s.mark_running(j.id, None).await.unwrap());
        assert_eq!(view(s, u.id, j.id).await.ray_start, Some(start));

        // RUNNING → SUCCEEDED with logs and result in the same move.
        let end = micros(1_767_225_700_000_001);
        let done = Finish {
            status: Succeeded,
            reason: None,
            logs: Some("done\n".into()),
            result_from_file: Some(r#"{"r":1}"#.into()),
            ray_start: None,
            ray_end: Some(end),
        };
        assert_eq!(s.finish(j.id, &done).await.unwrap(), Some(Succeeded));
        let v = view(s, u.id, j.id).await;
        assert_eq!(v.status, Succeeded);
        assert_eq!(v.logs.as_deref(), Some("done\n"));
        assert_eq!(v.result.as_deref(), Some(r#"{"r":1}"#));
        assert_eq!(
            v.ray_start,
            Some(start),
            "kept when the finish does not know it"
        );
        assert_eq!(v.ray_end, Some(end));
        assert!(v.finalized);
        assert!(v.updated >= v.created);

        // Terminal states never move.
        assert_eq!(s.finish(j.id, &fin(Failed, "again")).await.unwrap(), None);
        assert!(!s.mark_running(j.id, None).await.unwrap());
        assert!(!s.fail_queued(j.id, "x").await.unwrap());
        assert!(matches!(
            s.stop_job(u.id, j.id).await.unwrap(),
            StopOutcome::AlreadyTerminal
        ));
        assert!(
            s.claim_for_dispatch(j.id, "w3", TTL)
                .await
                .unwrap()
                .is_none()
        );
        let v = view(s, u.id, j.id).await;
        assert_eq!(v.status, Succeeded);
        assert_eq!(v.logs.as_deref(), Some("done\n"));

        // One event per move, newest first, with origin and context.
        assert_eq!(
            moves(s, u.id, j.id).await,
            ["SUCCEEDED", "RUNNING", "PENDING", "QUEUED"]
        );
        let all = s.events(u.id, j.id, None).await.unwrap().unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(
            (all[0].origin.as_str(), all[0].context.as_str()),
            ("SCHEDULER", "UPDATE_JOB_STATUS")
        );
        assert_eq!(
            (all[2].origin.as_str(), all[2].context.as_str()),
            ("SCHEDULER", "SCHEDULE_JOBS")
        );
        assert_eq!(
            (all[3].origin.as_str(), all[3].context.as_str()),
            ("API", "RUN_PROGRAM")
        );
        assert!(all.windows(2).all(|w| w[0].created >= w[1].created));
        assert_recent(all[0].created);
        assert!(
            s.events(u.id, j.id, Some("ERROR"))
                .await
                .unwrap()
                .unwrap()
                .is_empty()
        );

        // QUEUED → FAILED only from QUEUED.
        let k = queued(s, u.id, p.id).await;
        assert!(s.fail_queued(k.id, "no such artifact").await.unwrap());
        assert!(!s.fail_queued(k.id, "again").await.unwrap());
        let v = view(s, u.id, k.id).await;
        assert_eq!(v.status, Failed);
        assert_eq!(v.status_reason.as_deref(), Some("no such artifact"));
        assert_eq!(v.logs.as_deref(), Some("no such artifact"));
        assert!(v.finalized);
        assert!(
            s.claim_for_dispatch(k.id, "w1", TTL)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(moves(s, u.id, k.id).await, ["FAILED", "QUEUED"]);

        // finish on a job the user stopped keeps STOPPED but stores logs and result.
        let m = running(s, u.id, p.id).await;
        assert!(matches!(
            s.stop_job(u.id, m.id).await.unwrap(),
            StopOutcome::Stopped { was: Running, .. }
        ));
        let lost = Finish {
            status: Failed,
            reason: Some("lost".into()),
            logs: Some("partial logs".into()),
            result_from_file: Some("from file".into()),
            ray_start: None,
            ray_end: None,
        };
        assert_eq!(s.finish(m.id, &lost).await.unwrap(), Some(Stopped));
        let v = view(s, u.id, m.id).await;
        assert_eq!(v.status, Stopped);
        assert_eq!(v.logs.as_deref(), Some("partial logs"));
        assert_eq!(v.result.as_deref(), Some("from file"));
        assert_eq!(v.status_reason.as_deref(), Some("Stopped by the user."));
        assert!(v.finalized);
        assert_eq!(
            moves(s, u.id, m.id).await,
            ["STOPPED", "RUNNING", "PENDING", "QUEUED"]
        );

        // A POSTed result wins over the result file; PENDING may end directly.
        let n = pending(s, u.id, p.id).await;
        assert!(s.save_posted_result(u.id, n.id, "posted").await.unwrap());
        let with_file = Finish {
            result_from_file: Some("file".into()),
            ..fin(Succeeded, "ok")
        };
        assert_eq!(s.finish(n.id, &with_file).await.unwrap(), Some(Succeeded));
        let v = view(s, u.id, n.id).await;
        assert_eq!(v.result.as_deref(), Some("posted"));
        assert_eq!(
            moves(s, u.id, n.id).await,
            ["SUCCEEDED", "PENDING", "QUEUED"]
        );

        // A finish must name a terminal status.
        let o = pending(s, u.id, p.id).await;
        assert!(s.finish(o.id, &fin(Running, "")).await.is_err());
        assert_eq!(s.job_status(o.id).await.unwrap(), Some(Pending));
        // mark_running without a start time keeps none.
        assert!(s.mark_running(o.id, None).await.unwrap());
        assert_eq!(view(s, u.id, o.id).await.ray_start, None);
    }

    pub async fn active_limit_counter(s: &Store) {
        let u = user(s, "alice").await;
        let p = program(s, u.id, "fn").await;

        let a = create(s, &new_job(u.id, p.id), 2).await.expect("1 of 2");
        let b = create(s, &new_job(u.id, p.id), 2).await.expect("2 of 2");
        let refused = new_job(u.id, p.id);
        assert!(create(s, &refused, 2).await.is_none(), "at the limit");
        assert!(
            s.job(u.id, refused.id).await.unwrap().is_none(),
            "nothing inserted"
        );
        assert_eq!(
            s.list_jobs(u.id, &JobFilter::default(), None, 0)
                .await
                .unwrap()
                .0,
            2
        );

        // Each terminal move gives the slot back, exactly once.
        assert!(matches!(
            s.stop_job(u.id, a.id).await.unwrap(),
            StopOutcome::Stopped { was: Queued, .. }
        ));
        let d = create(s, &new_job(u.id, p.id), 2)
            .await
            .expect("a stop frees a slot");
        assert!(s.fail_queued(b.id, "bad").await.unwrap());
        let e = create(s, &new_job(u.id, p.id), 2)
            .await
            .expect("a failure frees a slot");
        assert!(create(s, &new_job(u.id, p.id), 2).await.is_none());
        dispatch(s, d.id).await;
        assert!(
            create(s, &new_job(u.id, p.id), 2).await.is_none(),
            "PENDING still counts"
        );
        assert!(s.mark_running(d.id, None).await.unwrap());
        assert!(
            create(s, &new_job(u.id, p.id), 2).await.is_none(),
            "RUNNING still counts"
        );
        assert_eq!(
            s.finish(d.id, &fin(Succeeded, "")).await.unwrap(),
            Some(Succeeded)
        );
        let f = create(s, &new_job(u.id, p.id), 2)
            .await
            .expect("a finish frees a slot");
        assert!(create(s, &new_job(u.id, p.id), 2).await.is_none());

        // Stopped while PENDING: the stop frees the slot, the later finish does not again.
        dispatch(s, e.id).await;
        assert!(matches!(
            s.stop_job(u.id, e.id).await.unwrap(),
            StopOutcome::Stopped { was: Pending, .. }
        ));
        assert_eq!(
            s.finish(e.id, &fin(Succeeded, "")).await.unwrap(),
            Some(Stopped)
        );
        assert!(matches!(
            s.stop_job(u.id, f.id).await.unwrap(),
            StopOutcome::Stopped { .. }
        ));

        // Back to 0: a limit of 1 admits exactly one.
        assert!(create(s, &new_job(u.id, p.id), 1).await.is_some());
        assert!(create(s, &new_job(u.id, p.id), 1).await.is_none());
        // The unfiltered count counts every job ever created.
        assert_eq!(
            s.list_jobs(u.id, &JobFilter::default(), None, 0)
                .await
                .unwrap()
                .0,
            6
        );
        // A user nobody created has no slots.
        assert!(create(s, &new_job(Uuid::new_v4(), p.id), 5).await.is_none());
    }

    pub async fn active_limit_is_atomic_under_concurrency(s: &Store) {
        let u = user(s, "bob").await;
        let p = program(s, u.id, "fn").await;
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let s = s.clone();
                let new = new_job(u.id, p.id);
                tokio::spawn(async move { create(&s, &new, 5).await })
            })
            .collect();
        let mut created = Vec::new();
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                Some(job) => created.push(job),
                None => refused += 1,
            }
        }
        assert_eq!(created.len(), 5, "exactly the limit is admitted");
        assert_eq!(refused, 15);
        let (count, rows) = s
            .list_jobs(u.id, &JobFilter::default(), None, 0)
            .await
            .unwrap();
        assert_eq!(count, 5);
        assert_eq!(rows.len(), 5);

        // End them all, each a different way; the counter returns to 0.
        assert!(matches!(
            s.stop_job(u.id, created[0].id).await.unwrap(),
            StopOutcome::Stopped { .. }
        ));
        assert!(s.fail_queued(created[1].id, "bad").await.unwrap());
        dispatch(s, created[2].id).await;
        assert_eq!(
            s.finish(created[2].id, &fin(Failed, "")).await.unwrap(),
            Some(Failed)
        );
        dispatch(s, created[3].id).await;
        assert!(s.mark_running(created[3].id, None).await.unwrap());
        assert_eq!(
            s.finish(created[3].id, &fin(Succeeded, "")).await.unwrap(),
            Some(Succeeded)
        );
        dispatch(s, created[4].id).await;
        assert!(matches!(
            s.stop_job(u.id, created[4].id).await.unwrap(),
            StopOutcome::Stopped { .. }
        ));
        assert_eq!(
            s.finish(created[4].id, &fin(Succeeded, "")).await.unwrap(),
            Some(Stopped)
        );

        assert!(
            create(s, &new_job(u.id, p.id), 1).await.is_some(),
            "counter back at 0"
        );
        assert!(
            create(s, &new_job(u.id, p.id), 1).await.is_none(),
            "counter exactly at 1"
        );
    }

    pub async fn pagination_and_filters(s: &Store) {
        let u = user(s, "alice").await;
        let other = user(s, "bob").await;
        let alpha = program(s, u.id, "alpha").await;
        let beta = program(s, u.id, "beta").await;
        let mut jobs = Vec::new();
        for i in 0..8 {
            let p = if i % 3 == 2 { &beta } else { &alpha };
            jobs.push(queued(s, u.id, p.id).await);
            tick().await;
        }
        let newest_first: Vec<Uuid> = jobs.iter().rev().map(|j| j.id).collect();
        let all = JobFilter::default();

        let (count, rows) = s.list_jobs(u.id, &all, None, 0).await.unwrap();
        assert_eq!(count, 8);
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), newest_first);
        let first = &rows[0];
        let last_job = jobs.last().unwrap();
        assert_eq!(first.created, last_job.created, "timestamps round-trip");
        assert_eq!(first.status, Queued);
        assert_eq!(first.sub_status, None);
        assert_eq!(first.program_id, alpha.id);
        assert_eq!(first.program_title, "alpha");
        assert_eq!(first.program_provider, None);

        for (offset, want) in [
            (0usize, &newest_first[0..3]),
            (3, &newest_first[3..6]),
            (6, &newest_first[6..8]),
            (8, &[][..]),
        ] {
            let (count, rows) = s
                .list_jobs(u.id, &all, Some(3), offset as i64)
                .await
                .unwrap();
            assert_eq!(count, 8, "the count ignores the page");
            assert_eq!(
                rows.iter().map(|r| r.id).collect::<Vec<_>>(),
                want,
                "page at offset {offset}"
            );
        }
        let (_, rows) = s.list_jobs(u.id, &all, Some(0), 0).await.unwrap();
        assert!(rows.is_empty());

        // By function.
        let alpha_newest: Vec<Uuid> = jobs
            .iter()
            .rev()
            .filter(|j| j.program_id == alpha.id)
            .map(|j| j.id)
            .collect();
        let by_alpha = JobFilter {
            function: Some("alpha".into()),
            ..Default::default()
        };
        let (count, rows) = s.list_jobs(u.id, &by_alpha, None, 0).await.unwrap();
        assert_eq!(count, 6);
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), alpha_newest);
        let (count, rows) = s.list_jobs(u.id, &by_alpha, Some(2), 1).await.unwrap();
        assert_eq!(count, 6);
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            &alpha_newest[1..3]
        );
        let by_beta = JobFilter {
            function: Some("beta".into()),
            ..Default::default()
        };
        assert_eq!(s.list_jobs(u.id, &by_beta, None, 0).await.unwrap().0, 2);
        let nope = JobFilter {
            function: Some("nope".into()),
            ..Default::default()
        };
        let (count, rows) = s.list_jobs(u.id, &nope, None, 0).await.unwrap();
        assert_eq!((count, rows.len()), (0, 0));

        // By status.
        assert!(s.fail_queued(jobs[0].id, "bad").await.unwrap());
        let failed = JobFilter {
            status: Some(Failed),
            ..Default::default()
        };
        let (count, rows) = s.list_jobs(u.id, &failed, None, 0).await.unwrap();
        assert_eq!(count, 1);
        assert_eq!(
            rows.iter().map(|r| (r.id, r.status)).collect::<Vec<_>>(),
            [(jobs[0].id, Failed)]
        );
        let queued_only = JobFilter {
            status: Some(Queued),
            ..Default::default()
        };
        assert_eq!(s.list_jobs(u.id, &queued_only, None, 0).await.unwrap().0, 7);
        let beta_queued = JobFilter {
            function: Some("beta".into()),
            status: Some(Queued),
            ..Default::default()
        };
        assert_eq!(s.list_jobs(u.id, &beta_queued, None, 0).await.unwrap().0, 2);
        assert_eq!(
            s.list_jobs(u.id, &all, None, 0).await.unwrap().0,
            8,
            "terminal jobs still count"
        );

        // By creation time (inclusive).
        let recent = JobFilter {
            created_after: Some(jobs[4].created),
            ..Default::default()
        };
        let (count, rows) = s.list_jobs(u.id, &recent, None, 0).await.unwrap();
        assert_eq!(count, 4);
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            &newest_first[0..4]
        );
        let future = JobFilter {
            created_after: Some(Utc::now() + chrono::Duration::hours(1)),
            ..Default::default()
        };
        assert_eq!(s.list_jobs(u.id, &future, None, 0).await.unwrap().0, 0);

        // Catalog: none of these functions has a provider.
        let catalog = JobFilter {
            catalog: Some(true),
            ..Default::default()
        };
        assert_eq!(s.list_jobs(u.id, &catalog, None, 0).await.unwrap().0, 0);
        let own = JobFilter {
            catalog: Some(false),
            ..Default::default()
        };
        assert_eq!(s.list_jobs(u.id, &own, None, 0).await.unwrap().0, 8);

        // Another user sees none of them.
        let (count, rows) = s.list_jobs(other.id, &all, None, 0).await.unwrap();
        assert_eq!((count, rows.len()), (0, 0));
        assert_eq!(
            s.list_jobs(other.id, &by_alpha, None, 0).await.unwrap().0,
            0
        );
        assert_eq!(
            s.list_jobs(Uuid::new_v4(), &all, None, 0).await.unwrap().0,
            0
        );
    }

    pub async fn per_user_isolation(s: &Store) {
        let alice = user(s, "alice").await;
        let bob = user(s, "bob").await;
        let p = program(s, alice.id, "fn").await;
        let j = queued(s, alice.id, p.id).await;

        for (who, id) in [(bob.id, j.id), (alice.id, Uuid::new_v4())] {
            assert!(s.job(who, id).await.unwrap().is_none());
            assert!(s.events(who, id, None).await.unwrap().is_none());
            assert!(matches!(
                s.stop_job(who, id).await.unwrap(),
                StopOutcome::NotFound
            ));
            assert!(matches!(
                s.set_sub_status(who, id, "MAPPING").await.unwrap(),
                SubStatusOutcome::NotFound
            ));
            assert!(!s.save_posted_result(who, id, "stolen").await.unwrap());
            assert_eq!(
                s.add_error_event(who, id, json!({ "e": 1 })).await.unwrap(),
                None
            );
        }
        // Bob's attempts changed nothing.
        let v = view(s, alice.id, j.id).await;
        assert_eq!(v.status, Queued);
        assert_eq!(v.result, None);
        assert_eq!(v.sub_status, None);
        assert_eq!(
            s.events(alice.id, j.id, None).await.unwrap().unwrap().len(),
            1
        );

        // The author's own calls work.
        let SubStatusOutcome::Updated(v) =
            s.set_sub_status(alice.id, j.id, "MAPPING").await.unwrap()
        else {
            panic!("the author can set the sub-status");
        };
        assert_eq!(v.job.sub_status.as_deref(), Some("MAPPING"));
        assert_eq!(v.program.id, p.id);
        assert!(matches!(
            s.set_sub_status(alice.id, j.id, "MAPPING").await.unwrap(),
            SubStatusOutcome::Updated(_)
        ));
        assert!(matches!(
            s.set_sub_status(alice.id, j.id, "WAITING_QPU")
                .await
                .unwrap(),
            SubStatusOutcome::Updated(_)
        ));
        let subs = s
            .events(alice.id, j.id, Some("SUB_STATUS_CHANGE"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(subs.len(), 2, "an unchanged sub-status writes no event");
        assert_eq!(subs[0].data, json!({ "sub_status": "WAITING_QPU" }));
        assert_eq!(
            (subs[0].origin.as_str(), subs[0].context.as_str()),
            ("API", "SET_SUB_STATUS")
        );

        let err = json!({ "message": "qpu gone", "code": 7 });
        assert_eq!(
            s.add_error_event(alice.id, j.id, err.clone())
                .await
                .unwrap(),
            Some(true)
        );
        let errors = s
            .events(alice.id, j.id, Some("ERROR"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].data, err);
        assert!(s.save_posted_result(alice.id, j.id, "mine").await.unwrap());
        assert_eq!(
            view(s, alice.id, j.id).await.result.as_deref(),
            Some("mine")
        );

        // Once terminal, no more sub-status or errors.
        assert!(matches!(
            s.stop_job(alice.id, j.id).await.unwrap(),
            StopOutcome::Stopped { was: Queued, .. }
        ));
        assert_eq!(
            view(s, alice.id, j.id).await.sub_status,
            None,
            "a stop clears the sub-status"
        );
        assert!(matches!(
            s.set_sub_status(alice.id, j.id, "MAPPING").await.unwrap(),
            SubStatusOutcome::NotActive(Stopped)
        ));
        assert_eq!(
            s.add_error_event(alice.id, j.id, json!({})).await.unwrap(),
            Some(false)
        );
    }

    pub async fn concurrent_claims_never_double_dispatch(s: &Store) {
        let u = user(s, "alice").await;
        s.put_artifact("sha-x", b"x").await.unwrap();
        let p = s
            .upsert_program(
                u.id,
                &ProgramUpsert {
                    title: "fn".into(),
                    entrypoint: Some("go.py".into()),
                    artifact: Some(("sha-x".into(), "x.tar".into())),
                    env_vars_sealed: Some(vec![4, 5]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        for round in 0..3 {
            let j = queued(s, u.id, p.id).await;
            let tasks: Vec<_> = (0..10)
                .map(|i| {
                    let s = s.clone();
                    let worker = format!("w{i}");
                    tokio::spawn(async move {
                        let got = s.claim_for_dispatch(j.id, &worker, TTL).await.unwrap();
                        (worker, got)
                    })
                })
                .collect();
            let mut winners = Vec::new();
            for t in tasks {
                let (worker, got) = t.await.unwrap();
                if let Some(d) = got {
                    winners.push((worker, d));
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: exactly one claim wins");
            let (winner, d) = winners.pop().unwrap();
            assert_eq!(d.id, j.id);
            assert_eq!(d.author_id, u.id);
            assert_eq!(d.username, "alice");
            assert_eq!(d.program_title, "fn");
            assert_eq!(d.provider, None);
            assert_eq!(d.entrypoint, "go.py");
            assert_eq!(d.artifact_sha256.as_deref(), Some("sha-x"));
            assert_eq!(d.arguments, r#"{"shots": 1024}"#);
            assert_eq!(d.env_sealed, Some(vec![1, 2, 3]));
            assert_eq!(d.program_env_sealed, Some(vec![4, 5]));
            assert_eq!(d.pip, ["numpy==2.0"]);
            assert_eq!(d.dispatch_attempts, 1);

            // A live claim is exclusive, even for its holder.
            assert!(
                s.claim_for_dispatch(j.id, &winner, TTL)
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(!s.renew_claim(j.id, "intruder", TTL).await.unwrap());
            assert!(s.renew_claim(j.id, &winner, TTL).await.unwrap());
            s.release_claim(j.id, "intruder").await.unwrap(); // not the holder: no effect
            assert!(
                s.claim_for_dispatch(j.id, "intruder", TTL)
                    .await
                    .unwrap()
                    .is_none()
            );
            s.release_claim(j.id, &winner).await.unwrap();
            let again = s
                .claim_for_dispatch(j.id, "intruder", TTL)
                .await
                .unwrap()
                .expect("released");
            assert_eq!(again.dispatch_attempts, 2);
            assert!(!s.renew_claim(j.id, &winner, TTL).await.unwrap());
            assert!(s.mark_pending(j.id, "intruder", RAY).await.unwrap());
        }
    }

    pub async fn claims_expire(s: &Store) {
        let u = user(s, "alice").await;
        let p = program(s, u.id, "fn").await;
        let j = queued(s, u.id, p.id).await;
        assert_eq!(
            ids(&s.dispatch_candidates(5, None, 10).await.unwrap()),
            [j.id]
        );
        assert!(
            s.claim_for_dispatch(j.id, "w1", Duration::from_secs(1))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            s.claim_for_dispatch(j.id, "w2", TTL)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            s.dispatch_candidates(5, None, 10).await.unwrap().is_empty(),
            "a live claim is no candidate"
        );

        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            ids(&s.dispatch_candidates(5, None, 10).await.unwrap()),
            [j.id],
            "an expired claim is"
        );
        let d = s
            .claim_for_dispatch(j.id, "w2", TTL)
            .await
            .unwrap()
            .expect("the claim expired");
        assert_eq!(d.dispatch_attempts, 2);
        assert!(
            !s.renew_claim(j.id, "w1", TTL).await.unwrap(),
            "w1 lost its claim"
        );
        assert!(!s.mark_pending(j.id, "w1", RAY).await.unwrap());
        assert!(s.mark_pending(j.id, "w2", RAY).await.unwrap());
        assert!(
            !s.renew_claim(j.id, "w2", TTL).await.unwrap(),
            "no claim on a PENDING job"
        );
    }

    pub async fn tracking_leases(s: &Store) {
        let u = user(s, "alice").await;
        let p = program(s, u.id, "fn").await;
        let j1 = pending(s, u.id, p.id).await;
        tick().await;
        let j2 = running(s, u.id, p.id).await;
        tick().await;
        let _queued = queued(s, u.id, p.id).await;
        let done = pending(s, u.id, p.id).await;
        assert_eq!(
            s.finish(done.id, &fin(Succeeded, "")).await.unwrap(),
            Some(Succeeded)
        );
        // Long enough that the calls below finish inside it on a loaded machine.
        let short = Duration::from_secs(2);

        let a = s.claim_tracking("A", short, 10).await.unwrap();
        // Submitted and not finalized (the row order is unspecified).
        assert_eq!(
            tracked(&a),
            HashSet::from([(j1.id, Pending), (j2.id, Running)])
        );
        for t in &a {
            assert_eq!(t.username, "alice");
            assert_eq!(t.ray_host, RAY);
            assert_eq!(t.program_title, "fn");
            assert_eq!(t.provider, None);
        }

        assert!(
            s.claim_tracking("B", short, 10).await.unwrap().is_empty(),
            "A holds the leases"
        );
        assert_eq!(
            s.claim_tracking("A", short, 10).await.unwrap().len(),
            2,
            "A keeps its own"
        );
        assert_eq!(
            s.claim_tracking("A", short, 1)
                .await
                .unwrap()
                .iter()
                .map(|t| t.id)
                .collect::<Vec<_>>(),
            [j1.id]
        );
        assert!(s.claim_tracking("B", short, 10).await.unwrap().is_empty());

        tokio::time::sleep(Duration::from_millis(2200)).await;
        let b = s.claim_tracking("B", short, 10).await.unwrap();
        assert_eq!(b.len(), 2, "A's leases expired");
        assert!(
            s.claim_tracking("A", short, 10).await.unwrap().is_empty(),
            "B holds them now"
        );

        assert_eq!(
            s.finish(j1.id, &fin(Succeeded, "")).await.unwrap(),
            Some(Succeeded)
        );
        assert_eq!(
            s.claim_tracking("B", short, 10)
                .await
                .unwrap()
                .iter()
                .map(|t| t.id)
                .collect::<Vec<_>>(),
            [j2.id]
        );

        // A job the user stopped while submitted is still tracked (to stop it on Ray).
        let st = pending(s, u.id, p.id).await;
        assert!(matches!(
            s.stop_job(u.id, st.id).await.unwrap(),
            StopOutcome::Stopped { was: Pending, .. }
        ));
        let b = s.claim_tracking("B", short, 10).await.unwrap();
        assert_eq!(
            tracked(&b),
            HashSet::from([(j2.id, Running), (st.id, Stopped)])
        );
    }

    pub async fn dispatch_candidates_one_per_user(s: &Store) {
        let u1 = user(s, "u1").await;
        let u2 = user(s, "u2").await;
        let u3 = user(s, "u3").await;
        let idle = user(s, "idle").await;
        let p1 = program(s, u1.id, "fn").await;
        let p2 = program(s, u2.id, "fn").await;
        let p3 = program(s, u3.id, "fn").await;
        let pi = program(s, idle.id, "fn").await;
        let q1a = queued(s, u1.id, p1.id).await;
        tick().await;
        let q1b = queued(s, u1.id, p1.id).await;
        let q2 = queued(s, u2.id, p2.id).await;
        let _r3 = running(s, u3.id, p3.id).await;
        let q3 = queued(s, u3.id, p3.id).await;
        let gone = queued(s, idle.id, pi.id).await;
        assert!(s.fail_queued(gone.id, "bad").await.unwrap());

        let one = s.dispatch_candidates(1, None, 100).await.unwrap();
        assert_eq!(one.len(), 2);
        assert_eq!(
            id_set(&one),
            HashSet::from([q1a.id, q2.id]),
            "u3 is at its running limit; oldest job per user"
        );
        let two = s.dispatch_candidates(2, None, 100).await.unwrap();
        assert_eq!(id_set(&two), HashSet::from([q1a.id, q2.id, q3.id]));
        assert_eq!(
            s.dispatch_candidates(2, None, 1).await.unwrap().len(),
            1,
            "the limit holds"
        );
        assert!(
            s.dispatch_candidates(0, None, 100)
                .await
                .unwrap()
                .is_empty()
        );

        // A live claim hides the job; the user's next job stands in.
        assert!(
            s.claim_for_dispatch(q1a.id, "w", TTL)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            id_set(&s.dispatch_candidates(1, None, 100).await.unwrap()),
            HashSet::from([q1b.id, q2.id])
        );
        assert!(
            s.claim_for_dispatch(q1b.id, "w", TTL)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            ids(&s.dispatch_candidates(1, None, 100).await.unwrap()),
            [q2.id]
        );
        s.release_claim(q1b.id, "w").await.unwrap();
        assert_eq!(
            id_set(&s.dispatch_candidates(1, None, 100).await.unwrap()),
            HashSet::from([q1b.id, q2.id])
        );
    }

    pub async fn dispatch_candidates_fair_order(s: &Store) {
        let x = user(s, "x").await;
        let y = user(s, "y").await;
        let z = user(s, "z").await;
        let px = program(s, x.id, "fn").await;
        let py = program(s, y.id, "fn").await;
        let pz = program(s, z.id, "fn").await;
        // y was served first, then x; z never.
        pending(s, y.id, py.id).await;
        tick().await;
        pending(s, x.id, px.id).await;
        tick().await;
        let qx = queued(s, x.id, px.id).await;
        let qy = queued(s, y.id, py.id).await;
        let qz = queued(s, z.id, pz.id).await;
        assert_eq!(
            ids(&s.dispatch_candidates(10, None, 100).await.unwrap()),
            [qz.id, qy.id, qx.id]
        );

        // Serving z sends it to the back.
        tick().await;
        dispatch(s, qz.id).await;
        let qz2 = queued(s, z.id, pz.id).await;
        assert_eq!(
            ids(&s.dispatch_candidates(10, None, 100).await.unwrap()),
            [qy.id, qx.id, qz2.id]
        );
        assert_eq!(
            ids(&s.dispatch_candidates(10, None, 2).await.unwrap()),
            [qy.id, qx.id]
        );
    }

    pub async fn dispatch_candidates_stale_filter(s: &Store) {
        let u = user(s, "u").await;
        let v = user(s, "v").await;
        let pu = program(s, u.id, "fn").await;
        let pv = program(s, v.id, "fn").await;
        let qu = queued(s, u.id, pu.id).await;
        tick().await;
        let _qu_younger = queued(s, u.id, pu.id).await;
        let qv = queued(s, v.id, pv.id).await;
        s.mark_enqueued(&[]).await.unwrap();
        s.mark_enqueued(&[qu.id]).await.unwrap();

        assert_eq!(
            id_set(&s.dispatch_candidates(10, None, 100).await.unwrap()),
            HashSet::from([qu.id, qv.id])
        );
        // The user's oldest job was woken just now: the sweep leaves the user alone.
        assert_eq!(
            ids(&s
                .dispatch_candidates(10, Some(Duration::from_secs(60)), 100)
                .await
                .unwrap()),
            [qv.id]
        );
        assert_eq!(
            ids(&s
                .dispatch_candidates(10, Some(Duration::from_secs(2)), 100)
                .await
                .unwrap()),
            [qv.id]
        );
        tokio::time::sleep(Duration::from_millis(2200)).await;
        assert_eq!(
            id_set(
                &s.dispatch_candidates(10, Some(Duration::from_secs(2)), 100)
                    .await
                    .unwrap()
            ),
            HashSet::from([qu.id, qv.id])
        );
        s.mark_enqueued(&[qu.id, qv.id]).await.unwrap();
        assert!(
            s.dispatch_candidates(10, Some(Duration::from_secs(2)), 100)
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn stop_job_outcomes(s: &Store) {
        let u = user(s, "alice").await;
        let p = program(s, u.id, "fn").await;

        // QUEUED: stopped and final at once.
        let q = queued(s, u.id, p.id).await;
        match s.stop_job(u.id, q.id).await.unwrap() {
            StopOutcome::Stopped { was, ray_host } => {
                assert_eq!(was, Queued);
                assert_eq!(ray_host, None);
            }
            other => panic!("unexpected {other:?}"),
        }
        let v = view(s, u.id, q.id).await;
        assert_eq!(v.status, Stopped);
        assert!(v.finalized && !v.ray_submitted);
        assert_eq!(v.status_reason.as_deref(), Some("Stopped by the user."));
        let stops = s
            .events(u.id, q.id, Some("STATUS_CHANGE"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stops[0].data, json!({ "status": "STOPPED" }));
        assert_eq!(
            (stops[0].origin.as_str(), stops[0].context.as_str()),
            ("API", "STOP_JOB")
        );
        assert!(matches!(
            s.stop_job(u.id, q.id).await.unwrap(),
            StopOutcome::AlreadyTerminal
        ));
        assert!(
            s.claim_for_dispatch(q.id, "w", TTL)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(s.finish(q.id, &fin(Succeeded, "")).await.unwrap(), None);

        // PENDING: stopped, but final only when its tracker finishes it.
        let pj = pending(s, u.id, p.id).await;
        match s.stop_job(u.id, pj.id).await.unwrap() {
            StopOutcome::Stopped { was, ray_host } => {
                assert_eq!(was, Pending);
                assert_eq!(ray_host.as_deref(), Some(RAY));
            }
            other => panic!("unexpected {other:?}"),
        }
        let v = view(s, u.id, pj.id).await;
        assert_eq!(v.status, Stopped);
        assert!(!v.finalized);
        assert!(!s.mark_running(pj.id, None).await.unwrap());
        assert!(
            s.claim_tracking("T", TTL, 10)
                .await
                .unwrap()
                .iter()
                .any(|t| t.id == pj.id && t.status == Stopped)
        );
        assert_eq!(
            s.finish(pj.id, &fin(Succeeded, "bye")).await.unwrap(),
            Some(Stopped)
        );
        let v = view(s, u.id, pj.id).await;
        assert!(v.finalized);
        assert_eq!(v.logs.as_deref(), Some("bye"));
        assert!(s.claim_tracking("T", TTL, 10).await.unwrap().is_empty());
        assert!(matches!(
            s.stop_job(u.id, pj.id).await.unwrap(),
            StopOutcome::AlreadyTerminal
        ));

        // RUNNING.
        let r = running(s, u.id, p.id).await;
        assert!(matches!(
            s.stop_job(u.id, r.id).await.unwrap(),
            StopOutcome::Stopped { was: Running, .. }
        ));
        assert_eq!(
            s.finish(r.id, &fin(Failed, "")).await.unwrap(),
            Some(Stopped)
        );

        // Terminal, and unknown.
        let f = queued(s, u.id, p.id).await;
        assert!(s.fail_queued(f.id, "bad").await.unwrap());
        assert!(matches!(
            s.stop_job(u.id, f.id).await.unwrap(),
            StopOutcome::AlreadyTerminal
        ));
        assert_eq!(s.job_status(f.id).await.unwrap(), Some(Failed));
        assert!(matches!(
            s.stop_job(u.id, Uuid::new_v4()).await.unwrap(),
            StopOutcome::NotFound
        ));

        // Every job ended: no slot is held.
        assert!(create(s, &new_job(u.id, p.id), 1).await.is_some());
        assert!(create(s, &new_job(u.id, p.id), 1).await.is_none());
    }

    pub async fn stop_racing_dispatch(s: &Store) {
        let u = user(s, "alice").await;
        let p = program(s, u.id, "fn").await;
        let d = queued(s, u.id, p.id).await;
        assert!(
            s.claim_for_dispatch(d.id, "w", TTL)
                .await
                .unwrap()
                .is_some()
        );
        // The user stops it while the worker submits it.
        assert!(matches!(
            s.stop_job(u.id, d.id).await.unwrap(),
            StopOutcome::Stopped { was: Queued, .. }
        ));
        assert!(view(s, u.id, d.id).await.finalized);
        assert!(
            !s.mark_pending(d.id, "w", RAY).await.unwrap(),
            "the stop won"
        );
        assert!(!s.renew_claim(d.id, "w", TTL).await.unwrap());
        s.mark_submitted_after_stop(d.id, RAY).await.unwrap();
        let v = view(s, u.id, d.id).await;
        assert_eq!(v.status, Stopped);
        assert!(v.ray_submitted && !v.finalized);
        assert_eq!(v.ray_host.as_deref(), Some(RAY));
        let tracked = s.claim_tracking("T", TTL, 10).await.unwrap();
        assert_eq!(
            tracked.iter().map(|t| (t.id, t.status)).collect::<Vec<_>>(),
            [(d.id, Stopped)]
        );
        assert_eq!(
            s.finish(d.id, &fin(Failed, "stopped on ray"))
                .await
                .unwrap(),
            Some(Stopped)
        );
        let v = view(s, u.id, d.id).await;
        assert!(v.finalized);
        assert_eq!(v.logs.as_deref(), Some("stopped on ray"));
        assert_eq!(moves(s, u.id, d.id).await, ["STOPPED", "QUEUED"]);
        // The slot was given back once.
        assert!(create(s, &new_job(u.id, p.id), 1).await.is_some());
        assert!(create(s, &new_job(u.id, p.id), 1).await.is_none());
    }

    pub async fn running_jobs_lists_submitted_active_jobs(s: &Store) {
        let alice = user(s, "alice").await;
        let bob = user(s, "bob").await;
        let pa = program(s, alice.id, "fn").await;
        let pb = program(s, bob.id, "fn").await;
        let a = pending(s, alice.id, pa.id).await;
        let b = running(s, bob.id, pb.id).await;
        queued(s, alice.id, pa.id).await;
        let done = running(s, bob.id, pb.id).await;
        assert_eq!(
            s.finish(done.id, &fin(Succeeded, "")).await.unwrap(),
            Some(Succeeded)
        );
        let got: HashSet<(Uuid, String)> = s.running_jobs().await.unwrap().into_iter().collect();
        assert_eq!(
            got,
            HashSet::from([(a.id, "alice".to_string()), (b.id, "bob".to_string())])
        );
    }
}
