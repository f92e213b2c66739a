//! The real current client against a whole gateway: API, Redis queue, two
//! workers and a real Ray head.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Options, TestGateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_client_runs_fails_stops_and_lists() {
    let gw = TestGateway::start(Options::default().workers(2)).await;
    let out = gw.python("client_flow.py", &[]).await;

    support::assert_client_flow(&out, "Job entrypoint command failed with exit code 1");
    let sleeper = out["sleeper_id"].as_str().unwrap();
    // The gateway answers CANCELED at once; Ray ends the driver shortly after.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ray = gw
            .ray_job(sleeper)
            .await
            .expect("Ray knows the stopped job");
        if ray["status"] == "STOPPED" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Ray job itself is stopped: {ray}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every slot is given back once the jobs ended, and their tokens wiped.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gw.leases().await > 0 {
        assert!(std::time::Instant::now() < deadline, "leases left behind");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secrets: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE env_sealed IS NOT NULL")
        .fetch_one(&gw.pool)
        .await
        .unwrap();
    assert_eq!(secrets, 0, "job tokens are wiped when jobs end");
    gw.shutdown().await;
}

/// A run is claimed when it is pushed, not at the worker's next poll: with
/// a 6 s heartbeat and a 20 s reconciler, only the push announcement can
/// bring the job to a worker within a couple of seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_follows_the_push_not_the_heartbeat() {
    let gw = TestGateway::start(
        Options::default()
            .workers(1)
            .var("GATEWAY_QUEUE_HEARTBEAT_MS", "6000")
            .var("GATEWAY_RECONCILE_INTERVAL_MS", "20000"),
    )
    .await;
    let (status, _) = gw
        .upload(support::TOKEN, "quick", &[("main.py", "print('hi')")])
        .await;
    assert_eq!(status, 200);
    // Let the worker register and park on an empty queue first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let id = gw.run(support::TOKEN, "quick", &json!({})).await;
        gw.wait_status(
            support::TOKEN,
            &id,
            &["PENDING", "RUNNING", "SUCCEEDED"],
            Duration::from_secs(30),
        )
        .await;
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_millis(2500),
            "the job waited {waited:?} in QUEUED"
        );
        gw.wait_status(support::TOKEN, &id, &["SUCCEEDED"], Duration::from_secs(60))
            .await;
    }
    gw.shutdown().await;
}
