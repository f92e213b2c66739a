//! The limits of DESIGN.md §4 against a whole gateway: per-user running
//! slots shared by several workers (`LIMITS_JOBS_PER_USER`), and the active
//! job limit checked atomically at submit (`LIMITS_ACTIVE_JOBS_PER_USER`).

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Options, TOKEN, TOKEN_BOB, TestGateway};

const SLEEPER: &str = r#"
import time
print("start", flush=True)
time.sleep(1.5)
print("end", flush=True)
"#;

/// Ray's own start and end of a job, in ms.
async fn ray_window(gw: &TestGateway, id: &str) -> (i64, i64) {
    let ray = gw
        .ray_job(id)
        .await
        .unwrap_or_else(|| panic!("Ray knows job {id}"));
    let start = ray["start_time"]
        .as_i64()
        .unwrap_or_else(|| panic!("start_time of {id}: {ray}"));
    let end = ray["end_time"]
        .as_i64()
        .unwrap_or_else(|| panic!("end_time of {id}: {ray}"));
    assert!(start < end, "job {id} has a sane window: {ray}");
    (start, end)
}

fn overlap(a: (i64, i64), b: (i64, i64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_one_user_never_overlap_but_two_users_do() {
    let gw = TestGateway::start(
        Options::default()
            .workers(2)
            .var("LIMITS_JOBS_PER_USER", "1"),
    )
    .await;
    for token in [TOKEN, TOKEN_BOB] {
        let (status, body) = gw.upload(token, "sleeper", &[("main.py", SLEEPER)]).await;
        assert_eq!(status, 200, "upload: {body}");
    }
    let mut alice = Vec::new();
    let mut bob = Vec::new();
    for _ in 0..3 {
        alice.push(gw.run(TOKEN, "sleeper", &json!({})).await);
        bob.push(gw.run(TOKEN_BOB, "sleeper", &json!({})).await);
    }
    let started = Instant::now();
    for id in &alice {
        assert_eq!(
            gw.wait_status(
                TOKEN,
                id,
                &["SUCCEEDED", "FAILED", "STOPPED"],
                Duration::from_secs(90)
            )
            .await,
            "SUCCEEDED"
        );
    }
    for id in &bob {
        assert_eq!(
            gw.wait_status(
                TOKEN_BOB,
                id,
                &["SUCCEEDED", "FAILED", "STOPPED"],
                Duration::from_secs(90)
            )
            .await,
            "SUCCEEDED"
        );
    }
    eprintln!("six jobs done in {:?}", started.elapsed());

    let mut alice_windows = Vec::new();
    for id in &alice {
        alice_windows.push(ray_window(&gw, id).await);
    }
    let mut bob_windows = Vec::new();
    for id in &bob {
        bob_windows.push(ray_window(&gw, id).await);
    }
    // What Ray saw is what the gateway stored.
    for (id, window) in alice
        .iter()
        .zip(&alice_windows)
        .chain(bob.iter().zip(&bob_windows))
    {
        let (start, end): (
            Option<chrono::DateTime<chrono::Utc>>,
            Option<chrono::DateTime<chrono::Utc>>,
        ) = sqlx::query_as("SELECT ray_start, ray_end FROM jobs WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&gw.pool)
            .await
            .unwrap();
        assert_eq!(
            start.map(|t| t.timestamp_millis()),
            Some(window.0),
            "ray_start of {id}"
        );
        assert_eq!(
            end.map(|t| t.timestamp_millis()),
            Some(window.1),
            "ray_end of {id}"
        );
    }

    for (name, windows) in [("alice", &alice_windows), ("bob", &bob_windows)] {
        for i in 0..windows.len() {
            for j in i + 1..windows.len() {
                assert!(
                    !overlap(windows[i], windows[j]),
                    "{name}'s jobs {i} and {j} overlap on Ray: {windows:?}"
                );
            }
        }
    }
    let crossed = alice_windows
        .iter()
        .any(|a| bob_windows.iter().any(|b| overlap(*a, *b)));
    assert!(
        crossed,
        "two users run side by side: alice {alice_windows:?}, bob {bob_windows:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.leases().await > 0 {
        assert!(
            Instant::now() < deadline,
            "leases left behind: {}",
            gw.leases().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every wake-up was acknowledged and then removed from Redis.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.queue_residue().await != (0, 0) {
        assert!(
            Instant::now() < deadline,
            "the queue keeps finished wake-ups: {:?}",
            gw.queue_residue().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_run_is_accepted_at_the_active_limit() {
    let gw = TestGateway::start(
        Options::default()
            .workers(0)
            .var("LIMITS_ACTIVE_JOBS_PER_USER", "3"),
    )
    .await;
    for token in [TOKEN, TOKEN_BOB] {
        let (status, body) = gw.upload(token, "sleeper", &[("main.py", SLEEPER)]).await;
        assert_eq!(status, 200, "upload: {body}");
    }
    gw.run(TOKEN, "sleeper", &json!({})).await;
    gw.run(TOKEN, "sleeper", &json!({})).await;

    let body = json!({
        "title": "sleeper",
        "arguments": "{}",
        "config": {"workers": null, "min_workers": null, "max_workers": null, "auto_scaling": false},
    });
    let runs = (0..8).map(|_| gw.post_json(TOKEN, "programs/run/", &body));
    let answers: Vec<(u16, Value)> = futures::future::join_all(runs).await;
    let accepted: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
        .collect();
    let refused: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(
        accepted.len(),
        1,
        "exactly one run fits under the limit: {answers:?}"
    );
    assert_eq!(
        refused.len(),
        7,
        "the others are refused with 429: {answers:?}"
    );
    assert_eq!(accepted[0]["status"], "QUEUED", "{}", accepted[0]);
    for body in &refused {
        let message = body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("a 429 carries a JSON message: {body}"));
        assert!(!message.is_empty(), "{body}");
    }

    let alice_jobs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs j JOIN users u ON u.id = j.author_id WHERE u.username = 'alice'",
    )
    .fetch_one(&gw.pool)
    .await
    .unwrap();
    assert_eq!(
        alice_jobs, 3,
        "the database holds exactly the accepted jobs"
    );
    let active: i32 = sqlx::query_scalar("SELECT active_jobs FROM users WHERE username = 'alice'")
        .fetch_one(&gw.pool)
        .await
        .unwrap();
    assert_eq!(active, 3, "the per-user counter agrees");

    // Bob has a limit of his own.
    let bob_job = gw.run(TOKEN_BOB, "sleeper", &json!({})).await;
    assert_eq!(gw.job_status(TOKEN_BOB, &bob_job).await, "QUEUED");
    // And alice is still refused.
    let (status, again) = gw.post_json(TOKEN, "programs/run/", &body).await;
    assert_eq!(status, 429, "{again}");
    gw.shutdown().await;
}
