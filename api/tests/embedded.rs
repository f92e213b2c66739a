//! The embedded single-node gateway as a newcomer runs it: the `gateway-api`
//! binary with no database and no Redis, the real client against it, and a
//! SIGKILL in the middle of a queue of jobs.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Embedded {
    child: Child,
    url: String,
    token: String,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `gateway-api` with only a data dir, a port and the interpreter
/// functions need (the venv with the SDK).
fn start(data: &Path, port: u16, extra: &[(&str, &str)]) -> Embedded {
    shared::init_crypto();
    let mut cmd = Command::new(support::binary("gateway-api"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .env("GATEWAY_DATA_DIR", data)
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "GATEWAY_PYTHON",
            support::required_env("GATEWAY_TEST_PYTHON"),
        )
        .envs(extra.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().expect("start gateway-api");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(200) = reqwest::blocking_get(&format!("{url}/readiness/")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the embedded gateway did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The generated token is kept under the data dir (and printed at start).
    let token = std::fs::read_to_string(data.join("token"))
        .expect("token file")
        .trim()
        .to_string();
    Embedded { child, url, token }
}

mod reqwest {
    /// A tiny blocking GET (std only), for readiness polling.
    pub fn blocking_get(url: &str) -> std::io::Result<u16> {
        use std::io::{Read, Write};
        let rest = url.trim_start_matches("http://");
        let (host, path) = rest
            .split_once('/')
            .map(|(h, p)| (h, format!("/{p}")))
            .unwrap_or((rest, "/".into()));
        let mut s = std::net::TcpStream::connect(host)?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0))
    }
}

async fn python(script: &str, gw: &Embedded, env: &[(&str, &str)]) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = tokio::process::Command::new(support::required_env("GATEWAY_TEST_PYTHON"))
        .arg(path)
        .env("GATEWAY_URL", &gw.url)
        .env("GATEWAY_TOKEN", &gw.token)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(
        stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default(),
    )
    .expect("JSON")
}

async fn job(gw: &Embedded, id: &str) -> Value {
    let resp = ::reqwest::Client::new()
        .get(format!("{}/api/v1/jobs/{id}/", gw.url))
        .bearer_auth(&gw.token)
        .send()
        .await
        .expect("GET job");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("job JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newcomer_runs_the_real_client_against_the_embedded_gateway() {
    let data = tempfile::tempdir().unwrap();
    let gw = start(data.path(), free_port(), &[]);
    let out = python("client_flow.py", &gw, &[]).await;
    support::assert_client_flow(&out, "The function exited with code 1.");
    // The stopped function's process group is gone.
    let sleeper = out["sleeper_id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while data.path().join("jobs").join(sleeper).join("pid").exists() {
        let pid: i32 = std::fs::read_to_string(data.path().join("jobs").join(sleeper).join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        if pid == 0 || unsafe { libc::kill(-pid, 0) } != 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the stopped function still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_embedded_gateway_finishes_its_queue_after_restart_without_running_anything_twice()
{
    let data = tempfile::tempdir().unwrap();
    let markers = tempfile::tempdir().unwrap();
    let port = free_port();
    let limits = [("LIMITS_MAX_CLUSTERS", "2"), ("LIMITS_JOBS_PER_USER", "2")];
    let mut gw = start(data.path(), port, &limits);
    const RUNS: usize = 6;
    let queued = python(
        "restart_queue.py",
        &gw,
        &[
            ("MARKER_DIR", markers.path().to_str().unwrap()),
            ("RUNS", "6"),
        ],
    )
    .await;
    let ids: Vec<String> = queued["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), RUNS);

    // Kill it while some run and the rest wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut running = 0;
        for id in &ids {
            if job(&gw, id).await["status"] == "RUNNING" {
                running += 1;
            }
        }
        if running >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "nothing started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = gw.child.kill();
    let _ = gw.child.wait();
    drop(gw);

    let gw = start(data.path(), port, &limits);
    let deadline = Instant::now() + Duration::from_secs(90);
    for (n, id) in ids.iter().enumerate() {
        let final_job = loop {
            let j = job(&gw, id).await;
            if ["SUCCEEDED", "FAILED", "STOPPED"].contains(&j["status"].as_str().unwrap()) {
                break j;
            }
            assert!(Instant::now() < deadline, "job {id} never ended: {j}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(final_job["status"], "SUCCEEDED", "{final_job}");
        let result: Value = serde_json::from_str(final_job["result"].as_str().unwrap()).unwrap();
        assert_eq!(result, json!({"n": n}));
        let marker = std::fs::read_to_string(markers.path().join(format!("marker-{n}"))).unwrap();
        assert_eq!(marker.lines().count(), 1, "run {n} executed exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_gateway_submits_to_a_ray_head_when_one_is_named() {
    let data = tempfile::tempdir().unwrap();
    let ray = support::ray_url();
    let gw = start(
        data.path(),
        free_port(),
        &[("RAY_CLUSTER_MODE_LOCAL_HOST", ray.as_str())],
    );
    let out = python("client_flow.py", &gw, &[]).await;
    assert_eq!(out["adder_result"], json!({"sum": 42}), "{out}");
    assert_eq!(out["sleeper_status"], "CANCELED");
    // The jobs ran on Ray, not as local processes.
    let client = ::reqwest::Client::new();
    let adder = out["adder_id"].as_str().unwrap();
    let on_ray: Value = client
        .get(format!("{ray}/api/jobs/{adder}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(on_ray["status"], "SUCCEEDED", "{on_ray}");
    assert!(
        !data.path().join("jobs").join(adder).exists(),
        "no local process was used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_embedded_gateway_per_data_dir() {
    let data = tempfile::tempdir().unwrap();
    let _first = start(data.path(), free_port(), &[]);
    let second = Command::new(support::binary("gateway-api"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GATEWAY_DATA_DIR", data.path())
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .expect("run a second gateway");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another embedded gateway is using the data dir"),
        "{stderr}"
    );
}
