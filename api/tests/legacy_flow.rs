//! The 2023 contract (API_CONTRACT.md §5) end to end on a real Ray head:
//! the `quantum_serverless` 0.1.2 flow that uploads and runs in one
//! multipart call, reads its arguments from `ENV_JOB_ARGUMENTS` and POSTs
//! its result back; and how a POSTed result and the current SDK's result
//! file combine (DESIGN.md §5: the POSTed value wins).

mod support;

use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use support::{Options, TOKEN, TestGateway, tar_of};

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

/// Standard library only, like a 2023 function: POSTs `{"result": value}`
/// as JSON to the gateway with the job's token.
const POST_RESULT: &str = r#"
import json
import os
import urllib.request


def post_result(value):
    host = os.environ["ENV_JOB_GATEWAY_HOST"]
    job_id = os.environ["ENV_JOB_ID_GATEWAY"]
    request = urllib.request.Request(
        f"{host}/api/v1/jobs/{job_id}/result/",
        data=json.dumps({"result": value}).encode(),
        headers={
            "Authorization": f"Bearer {os.environ['ENV_JOB_GATEWAY_TOKEN']}",
            "Content-Type": "application/json",
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        print("result saved:", response.status, flush=True)
"#;

fn legacy_main() -> String {
    format!(
        "{POST_RESULT}\n\
         args = json.loads(os.environ[\"ENV_JOB_ARGUMENTS\"])\n\
         print(f\"doubling {{args['x']}}\", flush=True)\n\
         post_result({{\"doubled\": args[\"x\"] * 2}})\n"
    )
}

/// The multipart `programs/run/` of quantum_serverless 0.1.2.
fn legacy_run_form(tar: &[u8]) -> Form {
    Form::new()
        .text("title", "legacy-doubler")
        .text("entrypoint", "main.py")
        .text("arguments", json!({"x": 21}).to_string())
        .text("dependencies", "[]")
        .part(
            "artifact",
            Part::bytes(tar.to_vec()).file_name("artifact.tar"),
        )
}

/// The saved result text of a finished job, parsed, from both routes that show it.
async fn result_of(gw: &TestGateway, id: &str) -> Value {
    let (status, job) = gw.get(TOKEN, &format!("jobs/{id}/")).await;
    assert_eq!(status, 200, "{job}");
    let text = job["result"]
        .as_str()
        .unwrap_or_else(|| panic!("result is a JSON string: {job}"));
    let from_job: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("result is JSON text ({e}): {text}"));

    let (status, body) = gw.get(TOKEN, &format!("jobs/{id}/result/")).await;
    assert_eq!(status, 200, "{body}");
    let text = body["result"]
        .as_str()
        .unwrap_or_else(|| panic!("{{\"result\": <string>}}: {body}"));
    let from_route: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("result is JSON text ({e}): {text}"));
    assert_eq!(from_job, from_route, "both routes show the same result");
    from_route
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_2023_uploads_runs_and_posts_its_result() {
    let gw = TestGateway::start(Options::default().workers(1)).await;
    let main_py = legacy_main();
    let tar = tar_of(&[("main.py", main_py.as_str())]);
    // Only an Authorization header, as the 2023 client sends.
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = http
            .post(gw.api("programs/run/"))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .multipart(legacy_run_form(&tar))
            .send()
            .await
            .expect("POST programs/run/");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("JSON answer");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "QUEUED", "{body}");
        assert!(body["result"].is_null(), "{body}");
        ids.push(body["id"].as_str().expect("job id").to_string());
    }
    assert_ne!(ids[0], ids[1]);
    // The same request made by Python's `tarfile` and `requests`, exactly as 0.1.2 builds it.
    let out = gw
        .python("legacy_client.py", &[("LEGACY_MAIN", main_py.as_str())])
        .await;
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["body"]["status"], "QUEUED", "{out}");
    ids.push(out["body"]["id"].as_str().expect("job id").to_string());

    for id in &ids {
        let status = gw
            .wait_status(TOKEN, id, &["SUCCEEDED", "FAILED", "STOPPED"], JOB_TIMEOUT)
            .await;
        let (_, logs) = gw.get(TOKEN, &format!("jobs/{id}/logs/")).await;
        if status != "SUCCEEDED" {
            panic!("job is {status}: {logs}; Ray: {:?}", gw.ray_job(id).await);
        }
        // The old client's `result()`: `json.loads(job["result"] or "{}")` from `GET jobs/{id}/`.
        assert_eq!(result_of(&gw, id).await, json!({"doubled": 42}));
        let logs = logs["logs"].as_str().unwrap_or_default();
        assert!(
            logs.contains("doubling 21"),
            "ENV_JOB_ARGUMENTS holds the real arguments: {logs}"
        );
    }

    // Three uploads of the same title updated one function.
    let (status, programs) = gw.get(TOKEN, "programs/").await;
    assert_eq!(status, 200, "{programs}");
    let titled: Vec<&Value> = programs
        .as_array()
        .expect("bare array")
        .iter()
        .filter(|p| p["title"] == "legacy-doubler")
        .collect();
    assert_eq!(titled.len(), 1, "{programs}");
    assert_eq!(programs.as_array().unwrap().len(), 1, "{programs}");
    assert_eq!(titled[0]["entrypoint"], "main.py");

    // The old client lists jobs and reads `results[].id`.
    let (status, page) = gw.get(TOKEN, "jobs/").await;
    assert_eq!(status, 200, "{page}");
    let listed: Vec<&str> = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[2].as_str(), &ids[1], &ids[0]], "newest first");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_result_wins_over_the_result_file() {
    let gw = TestGateway::start(Options::default().workers(1)).await;
    // Both: the current SDK writes RESULTS_PATH, then a POST. The POST wins.
    let both = format!(
        "{POST_RESULT}\n\
         from qiskit_serverless import save_result\n\
         assert save_result({{\"from\": \"file\"}})\n\
         post_result({{\"from\": \"post\"}})\n"
    );
    // The other order: still the POSTed value.
    let post_first = format!(
        "{POST_RESULT}\n\
         from qiskit_serverless import save_result\n\
         post_result({{\"from\": \"post\"}})\n\
         assert save_result({{\"from\": \"file\"}})\n"
    );
    // Only the file: it is the result.
    let file_only =
        "from qiskit_serverless import save_result\nassert save_result({\"from\": \"file\"})\n";
    let mut jobs = Vec::new();
    for (title, main_py, expected) in [
        ("both", both.as_str(), json!({"from": "post"})),
        ("post-first", post_first.as_str(), json!({"from": "post"})),
        ("file-only", file_only, json!({"from": "file"})),
    ] {
        let (status, body) = gw.upload(TOKEN, title, &[("main.py", main_py)]).await;
        assert_eq!(status, 200, "{body}");
        jobs.push((title, gw.run(TOKEN, title, &json!({})).await, expected));
    }
    for (title, id, expected) in &jobs {
        let status = gw
            .wait_status(TOKEN, id, &["SUCCEEDED", "FAILED", "STOPPED"], JOB_TIMEOUT)
            .await;
        if status != "SUCCEEDED" {
            let (_, logs) = gw.get(TOKEN, &format!("jobs/{id}/logs/")).await;
            panic!(
                "{title} is {status}: {logs}; Ray: {:?}",
                gw.ray_job(id).await
            );
        }
        assert_eq!(&result_of(&gw, id).await, expected, "{title}");
    }
    gw.shutdown().await;
}
