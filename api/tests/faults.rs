//! Faults a deployment meets (DESIGN.md §2–§5): Redis down at submit, a
//! worker killed mid-dispatch, stops that race the dispatcher, and logs
//! above the cap. Real Postgres, Redis, worker processes and Ray.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Options, TOKEN, TestGateway};
use uuid::Uuid;

const TERMINAL: &[&str] = &["SUCCEEDED", "FAILED", "STOPPED"];

const ADDER: &str = r#"
from qiskit_serverless import get_arguments, save_result
args = get_arguments()
print(f"adding {args['a']} and {args['b']}", flush=True)
save_result({"sum": args["a"] + args["b"]})
"#;

/// Appends one line to the file named in its arguments: counts how often
/// the function body ran.
const MARKER: &str = r#"
import os
from qiskit_serverless import get_arguments, save_result
args = get_arguments()
with open(args["marker"], "a") as f:
    f.write(f"ran {os.getpid()}\n")
save_result({"marked": True})
"#;

const SLOW: &str = r#"
import time
print("started", flush=True)
time.sleep(1)
"#;

/// ~1 MB of numbered lines, then a last line.
const CHATTY: &str = r#"
import sys
for i in range(20000):
    sys.stdout.write(f"line {i:06d} " + "x" * 40 + "\n")
sys.stdout.write("THE END\n")
sys.stdout.flush()
"#;

/// A redis-server of this test's own, killed when dropped (also on failure).
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = OwnRedis {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        redis.restart().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits until it answers.
    async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(support::required_env("GATEWAY_TEST_REDIS_SERVER"))
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not come up",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn upload(gw: &TestGateway, title: &str, source: &str) {
    let (status, body) = gw.upload(TOKEN, title, &[("main.py", source)]).await;
    assert_eq!(status, 200, "upload {title}: {body}");
}

async fn claimed_by(gw: &TestGateway, id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT claimed_by FROM jobs WHERE id = $1")
        .bind(Uuid::parse_str(id).unwrap())
        .fetch_one(&gw.pool)
        .await
        .unwrap()
}

/// Waits until a worker holds the dispatch claim of the job; returns who.
async fn wait_claimed(gw: &TestGateway, id: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(worker) = claimed_by(gw, id).await {
            return worker;
        }
        assert!(
            Instant::now() < deadline,
            "no worker claimed job {id} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn result_of(gw: &TestGateway, id: &str) -> Value {
    let (status, body) = gw.get(TOKEN, &format!("jobs/{id}/result/")).await;
    assert_eq!(status, 200, "result of {id}: {body}");
    let text = body["result"]
        .as_str()
        .unwrap_or_else(|| panic!("a stored result: {body}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("result is JSON ({e}): {text}"))
}

async fn stop(gw: &TestGateway, id: &str) {
    let (status, body) = gw
        .post_json(TOKEN, &format!("jobs/{id}/stop/"), &json!({}))
        .await;
    assert_eq!(status, 200, "stop: {body}");
    assert_eq!(body["message"], "Job has been stopped.", "{body}");
}

/// How many jobs Ray holds under this submission id.
async fn ray_jobs_with_submission_id(id: &str) -> usize {
    let all: Vec<Value> = reqwest::get(format!("{}/api/jobs/", support::ray_url()))
        .await
        .expect("Ray job list")
        .json()
        .await
        .expect("Ray job list JSON");
    all.iter().filter(|j| j["submission_id"] == id).count()
}

async fn wait_no_leases(gw: &TestGateway, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let n = gw.leases().await;
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{n} slot leases left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_submitted_while_redis_is_down_still_completes() {
    let mut redis = OwnRedis::start().await;
    let gw = TestGateway::start(Options::default().workers(1).redis(redis.url())).await;
    upload(&gw, "adder", ADDER).await;
    // The worker is up and attached to the queue before the outage.
    let warm = gw.run(TOKEN, "adder", &json!({"a": 1, "b": 2})).await;
    assert_eq!(
        gw.wait_status(TOKEN, &warm, TERMINAL, Duration::from_secs(60))
            .await,
        "SUCCEEDED"
    );

    redis.kill();
    let asked = Instant::now();
    let id = gw.run(TOKEN, "adder", &json!({"a": 20, "b": 22})).await;
    let answered = asked.elapsed();
    assert!(
        answered < Duration::from_secs(5),
        "the run is not held by the outage: {answered:?}"
    );
    assert_eq!(
        gw.job_status(TOKEN, &id).await,
        "QUEUED",
        "committed while Redis is down"
    );
    // Nothing moves while the queue is gone (the reconciler's sweeps fail too).
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(gw.job_status(TOKEN, &id).await, "QUEUED");
    }
    let enqueued: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT enqueued_at FROM jobs WHERE id = $1")
            .bind(Uuid::parse_str(&id).unwrap())
            .fetch_one(&gw.pool)
            .await
            .unwrap();
    assert_eq!(
        enqueued, None,
        "no wake-up got through while Redis was down"
    );

    redis.restart().await;
    let back = Instant::now();
    let status = gw
        .wait_status(TOKEN, &id, TERMINAL, Duration::from_secs(60))
        .await;
    assert_eq!(status, "SUCCEEDED");
    eprintln!(
        "run answered in {answered:?}; SUCCEEDED {:?} after Redis came back",
        back.elapsed()
    );
    assert_eq!(result_of(&gw, &id).await, json!({"sum": 42}));
    assert!(gw.ray_job(&id).await.is_some(), "Ray ran it");
    wait_no_leases(&gw, Duration::from_secs(10)).await;
    gw.shutdown().await;
    redis.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_dispatch_is_replaced_within_seconds() {
    let mut gw = TestGateway::start(Options::default().workers(0)).await;
    upload(&gw, "marker", MARKER).await;
    let marker: PathBuf = gw.data_dir.path().join("marker.txt");
    let pid = gw.spawn_worker_process(&[("GATEWAY_TEST_DISPATCH_PAUSE_MS", "4000")]);

    let id = gw
        .run(
            TOKEN,
            "marker",
            &json!({"marker": marker.display().to_string()}),
        )
        .await;
    let doomed = wait_claimed(&gw, &id, Duration::from_secs(30)).await;
    gw.kill_process(pid);
    let killed = Instant::now();
    assert!(
        gw.ray_job(&id).await.is_none(),
        "the worker died before submitting"
    );
    assert_eq!(gw.job_status(TOKEN, &id).await, "QUEUED");

    gw.add_worker();
    let left_queue = ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"];
    gw.wait_status(TOKEN, &id, &left_queue, Duration::from_secs(20))
        .await;
    let taken_over = killed.elapsed();
    let status = gw
        .wait_status(
            TOKEN,
            &id,
            TERMINAL,
            Duration::from_secs(20).saturating_sub(taken_over),
        )
        .await;
    let took = killed.elapsed();
    assert_eq!(status, "SUCCEEDED");
    eprintln!("submitted again {taken_over:?} and SUCCEEDED {took:?} after the worker was killed");
    assert!(took <= Duration::from_secs(20), "{took:?}");

    let events: Vec<String> =
        sqlx::query_scalar("SELECT data->>'status' FROM job_events WHERE job_id = $1 ORDER BY id")
            .bind(Uuid::parse_str(&id).unwrap())
            .fetch_all(&gw.pool)
            .await
            .unwrap();
    // One clean path: a single submission (RUNNING may be skipped by a fast job).
    let pending = events.iter().filter(|e| *e == "PENDING").count();
    assert_eq!(
        (
            events.first().map(String::as_str),
            pending,
            events.last().map(String::as_str)
        ),
        (Some("QUEUED"), 1, Some("SUCCEEDED")),
        "{events:?}"
    );
    let last_claim: Option<String> = claimed_by(&gw, &id).await;
    assert_ne!(
        last_claim.as_deref(),
        Some(doomed.as_str()),
        "the dead worker's claim is gone"
    );

    let lines = std::fs::read_to_string(&marker).expect("marker file written");
    assert_eq!(
        lines.lines().count(),
        1,
        "the function body ran exactly once: {lines:?}"
    );
    assert_eq!(result_of(&gw, &id).await, json!({"marked": true}));
    assert_eq!(
        ray_jobs_with_submission_id(&id).await,
        1,
        "Ray holds one job for the submission id"
    );
    wait_no_leases(&gw, Duration::from_secs(10)).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_while_queued_never_reaches_ray() {
    let mut gw = TestGateway::start(Options::default().workers(0)).await;
    upload(&gw, "slow", SLOW).await;
    let id = gw.run(TOKEN, "slow", &json!({})).await;
    assert_eq!(gw.job_status(TOKEN, &id).await, "QUEUED");
    stop(&gw, &id).await;
    assert_eq!(gw.job_status(TOKEN, &id).await, "STOPPED");
    // A second stop finds it final.
    let (status, body) = gw
        .post_json(TOKEN, &format!("jobs/{id}/stop/"), &json!({}))
        .await;
    assert_eq!(
        (status, body["message"].as_str()),
        (200, Some("Job already in terminal state."))
    );

    gw.add_worker();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gw.job_status(TOKEN, &id).await, "STOPPED");
    assert!(
        gw.ray_job(&id).await.is_none(),
        "a job stopped while queued never reaches Ray"
    );
    assert_eq!(gw.leases().await, 0);
    let active: i32 = sqlx::query_scalar("SELECT active_jobs FROM users WHERE username = 'alice'")
        .fetch_one(&gw.pool)
        .await
        .unwrap();
    assert_eq!(active, 0, "the stopped job no longer counts as active");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_a_slow_dispatch_step_undoes_it() {
    let gw = TestGateway::start(
        Options::default()
            .workers(1)
            .var("GATEWAY_TEST_DISPATCH_PAUSE_MS", "3000"),
    )
    .await;
    upload(&gw, "slow", SLOW).await;
    let id = gw.run(TOKEN, "slow", &json!({})).await;
    wait_claimed(&gw, &id, Duration::from_secs(30)).await;
    // The dispatcher takes the job's slots (user and cluster) right after the
    // claim and holds them through its slow step.
    let deadline = Instant::now() + Duration::from_secs(2);
    while gw.leases().await < 2 {
        assert!(Instant::now() < deadline, "the dispatcher took its slots");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(&gw, &id).await;
    assert_eq!(gw.job_status(TOKEN, &id).await, "STOPPED");

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(gw.job_status(TOKEN, &id).await, "STOPPED");
    assert!(
        gw.ray_job(&id).await.is_none(),
        "the dispatcher saw the stop and never submitted"
    );
    assert_eq!(
        gw.leases().await,
        0,
        "the slots taken for the dispatch are given back"
    );
    assert_eq!(claimed_by(&gw, &id).await, None, "the claim is given back");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_above_the_cap_keep_the_tail_with_a_marker() {
    const CAP: usize = 65536;
    let gw = TestGateway::start(
        Options::default()
            .workers(1)
            .var("FUNCTIONS_LOGS_SIZE_LIMIT", CAP.to_string()),
    )
    .await;
    upload(&gw, "chatty", CHATTY).await;
    let id = gw.run(TOKEN, "chatty", &json!({})).await;
    assert_eq!(
        gw.wait_status(TOKEN, &id, TERMINAL, Duration::from_secs(60))
            .await,
        "SUCCEEDED"
    );

    let (status, body) = gw.get(TOKEN, &format!("jobs/{id}/logs/")).await;
    assert_eq!(status, 200, "{body}");
    let logs = body["logs"]
        .as_str()
        .unwrap_or_else(|| panic!("logs: {body}"));
    assert!(
        logs.len() <= CAP + 200,
        "logs are capped: {} bytes",
        logs.len()
    );
    assert!(
        logs.len() >= CAP / 2,
        "the tail is kept, not dropped: {} bytes",
        logs.len()
    );
    assert!(
        logs.contains("log truncated"),
        "a truncation marker: {}",
        &logs[..200.min(logs.len())]
    );
    let tail_start = logs.len().saturating_sub(200);
    assert!(
        logs.is_char_boundary(tail_start) && logs[tail_start..].contains("THE END"),
        "the tail: {}",
        &logs[tail_start..]
    );
    assert!(!logs.contains("line 000000 "), "the head is dropped");
    assert!(
        logs.contains("line 019999 "),
        "the last numbered line is kept"
    );

    let stored: Option<String> = sqlx::query_scalar("SELECT logs FROM jobs WHERE id = $1")
        .bind(Uuid::parse_str(&id).unwrap())
        .fetch_one(&gw.pool)
        .await
        .unwrap();
    assert_eq!(
        stored.as_deref(),
        Some(logs),
        "the API serves the stored, capped logs"
    );
    gw.shutdown().await;
}

/// Ray keeps a job's env (the user's token) in its job table; the gateway
/// deletes ended jobs there after the retention, and still serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_jobs_are_deleted_from_ray_after_the_retention() {
    let gw = TestGateway::start(
        Options::default()
            .workers(1)
            .var("GATEWAY_RAY_JOB_RETENTION_SECONDS", "5"),
    )
    .await;
    let (status, _) = gw
        .upload(support::TOKEN, "quick", &[("main.py", "from qiskit_serverless import save_result\nprint('quick run')\nsave_result({'ok': True})\n")])
        .await;
    assert_eq!(status, 200);
    let id = gw
        .run(support::TOKEN, "quick", &serde_json::json!({}))
        .await;
    gw.wait_status(support::TOKEN, &id, &["SUCCEEDED"], Duration::from_secs(60))
        .await;
    assert!(
        gw.ray_job(&id).await.is_some(),
        "Ray holds the job right after it ended"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while gw.ray_job(&id).await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the ended job is still in Ray's job table"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Deleted for good (not written back by Ray's job monitor).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(gw.ray_job(&id).await.is_none());
    let forgotten: bool = sqlx::query_scalar("SELECT ray_forgotten FROM jobs WHERE id = $1::uuid")
        .bind(&id)
        .fetch_one(&gw.pool)
        .await
        .unwrap();
    assert!(forgotten);
    let (_, job) = gw.get(support::TOKEN, &format!("jobs/{id}/")).await;
    assert_eq!(job["status"], "SUCCEEDED");
    assert_eq!(job["result"], "{\"ok\": true}");
    let (_, logs) = gw.get(support::TOKEN, &format!("jobs/{id}/logs/")).await;
    assert!(
        logs["logs"].as_str().unwrap().contains("quick run"),
        "{logs}"
    );
    gw.shutdown().await;
}
