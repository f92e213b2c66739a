//! Test harness: a whole gateway (API on port 0, workers in-process or as
//! processes) against a fresh Postgres database, a fresh Redis key prefix,
//! a temporary data dir and the shared Ray head that `scripts/test.sh`
//! starts. Nothing here is mocked.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::config::Config;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const TOKEN: &str = "alice-token";
pub const TOKEN_BOB: &str = "bob-token";

/// A variable `scripts/test.sh` provides. Missing means the suite was not
/// started through it: fail loudly rather than skip.
pub fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh, which provisions Postgres, Redis and Ray")
    })
}

pub fn ray_url() -> String {
    required_env("GATEWAY_TEST_RAY_URL")
}

/// Creates an empty database of its own for one test.
pub async fn fresh_database() -> (String, String) {
    let admin_url = required_env("GATEWAY_TEST_DATABASE_URL");
    let name = format!("gwt_{}", Uuid::new_v4().simple());
    let admin = PgPool::connect(&admin_url)
        .await
        .expect("connect to the test Postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').expect("database URL has a path");
    (format!("{base}/{name}"), name)
}

pub async fn drop_database(name: &str) {
    let admin_url = required_env("GATEWAY_TEST_DATABASE_URL");
    if let Ok(admin) = PgPool::connect(&admin_url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
        admin.close().await;
    }
}

/// Builder for a test gateway.
pub struct Options {
    pub workers: usize,
    pub vars: BTreeMap<String, String>,
    pub redis_url: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            workers: 1,
            vars: BTreeMap::new(),
            redis_url: None,
        }
    }
}

impl Options {
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    pub fn var(mut self, k: &str, v: impl Into<String>) -> Self {
        self.vars.insert(k.to_string(), v.into());
        self
    }
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }
}

struct InProcessWorker {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

pub struct TestGateway {
    pub url: String,
    pub vars: BTreeMap<String, String>,
    pub db_name: String,
    pub pool: PgPool,
    pub prefix: String,
    pub redis_url: String,
    pub data_dir: tempfile::TempDir,
    api_stop: Option<oneshot::Sender<()>>,
    api_task: Option<JoinHandle<std::io::Result<()>>>,
    workers: Vec<InProcessWorker>,
    processes: Vec<Child>,
    http: reqwest::Client,
}

fn config_from(vars: &BTreeMap<String, String>) -> Config {
    Config::from_lookup(|k| vars.get(k).cloned()).expect("test configuration is valid")
}

impl TestGateway {
    pub async fn start(opts: Options) -> TestGateway {
        shared::init_crypto();
        shared::telemetry::init_for_tests();
        let (db_url, db_name) = fresh_database().await;
        let redis_url = opts
            .redis_url
            .clone()
            .unwrap_or_else(|| required_env("GATEWAY_TEST_REDIS_URL"));
        let prefix = format!("gwt:{}", Uuid::new_v4().simple());
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut vars: BTreeMap<String, String> = [
            ("DATABASE_URL", db_url.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("GATEWAY_REDIS_PREFIX", prefix.as_str()),
            ("GATEWAY_LISTEN", "127.0.0.1:0"),
            ("SETTINGS_AUTH_MECHANISM", "mock_token"),
            (
                "SETTINGS_AUTH_MOCK_TOKENS",
                "alice-token=alice,bob-token=bob",
            ),
            ("GATEWAY_SECRET_KEY", "test-secret"),
            ("RAY_CLUSTER_MODE_LOCAL", "1"),
            ("GATEWAY_QUEUE_HEARTBEAT_MS", "500"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        vars.insert(
            "GATEWAY_DATA_DIR".into(),
            data_dir.path().display().to_string(),
        );
        if let Ok(ray) = std::env::var("GATEWAY_TEST_RAY_URL") {
            vars.insert("RAY_CLUSTER_MODE_LOCAL_HOST".into(), ray);
        }
        vars.extend(opts.vars.clone());

        let app = api::startup::Application::build(config_from(&vars))
            .await
            .expect("API starts");
        let url = format!("http://{}", app.addr());
        // Workers (in-process or spawned) reach the API at its real address.
        vars.insert("SITE_HOST".into(), url.clone());
        let (api_stop, rx) = oneshot::channel();
        let api_task = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        let pool = PgPool::connect(&db_url)
            .await
            .expect("connect test database");
        let mut gw = TestGateway {
            url,
            vars,
            db_name,
            pool,
            prefix,
            redis_url,
            data_dir,
            api_stop: Some(api_stop),
            api_task: Some(api_task),
            workers: Vec::new(),
            processes: Vec::new(),
            http: reqwest::Client::new(),
        };
        for _ in 0..opts.workers {
            gw.add_worker();
        }
        gw
    }

    /// Starts one more worker inside this test process.
    pub fn add_worker(&mut self) {
        let config = config_from(&self.vars);
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(worker::run(config, async move {
            let _ = rx.await;
        }));
        self.workers.push(InProcessWorker { stop, task });
    }

    /// Starts a `gateway-worker` process with this gateway's configuration
    /// plus `extra` variables.
    pub fn spawn_worker_process(&mut self, extra: &[(&str, &str)]) -> u32 {
        let mut cmd = Command::new(binary("gateway-worker"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.vars)
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn gateway-worker");
        let pid = child.id();
        self.processes.push(child);
        pid
    }

    /// SIGKILLs a worker process started by [`Self::spawn_worker_process`].
    pub fn kill_process(&mut self, pid: u32) {
        if let Some(pos) = self.processes.iter().position(|c| c.id() == pid) {
            let mut child = self.processes.remove(pos);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1/{}", self.url, path.trim_start_matches('/'))
    }

    pub async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.api(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET");
        status_json(resp).await
    }

    pub async fn post_json(&self, token: &str, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.api(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("POST");
        status_json(resp).await
    }

    pub async fn post_form(
        &self,
        token: &str,
        path: &str,
        form: reqwest::multipart::Form,
    ) -> (u16, Value) {
        let resp = self
            .http
            .post(self.api(path))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .expect("POST");
        status_json(resp).await
    }

    /// Uploads a function from in-memory files (made into a tar like the client does).
    pub async fn upload(&self, token: &str, title: &str, files: &[(&str, &str)]) -> (u16, Value) {
        let form = reqwest::multipart::Form::new()
            .text("title", title.to_string())
            .text("entrypoint", "main.py")
            .text("dependencies", "[]")
            .text("env_vars", "{}")
            .part(
                "artifact",
                reqwest::multipart::Part::bytes(tar_of(files)).file_name("artifact.tar"),
            );
        self.post_form(token, "programs/upload/", form).await
    }

    /// Runs a stored function with JSON arguments; returns the job id.
    pub async fn run(&self, token: &str, title: &str, arguments: &Value) -> String {
        let body = serde_json::json!({
            "title": title,
            "arguments": arguments.to_string(),
            "config": {"workers": null, "min_workers": null, "max_workers": null, "auto_scaling": false},
        });
        let (status, job) = self.post_json(token, "programs/run/", &body).await;
        assert_eq!(status, 200, "run answered {job}");
        job["id"].as_str().expect("job id").to_string()
    }

    pub async fn job_status(&self, token: &str, id: &str) -> String {
        let (status, job) = self
            .get(token, &format!("jobs/{id}/?with_result=false"))
            .await;
        assert_eq!(status, 200, "job lookup answered {job}");
        job["status"].as_str().expect("status").to_string()
    }

    /// Waits until the job's status is one of `wanted`.
    pub async fn wait_status(
        &self,
        token: &str,
        id: &str,
        wanted: &[&str],
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.job_status(token, id).await;
            if wanted.contains(&status.as_str()) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} is {status} after {timeout:?}, expected one of {wanted:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a Python script from `api/tests/python/` with the current
    /// client's venv; the script prints one JSON document last.
    pub async fn python(&self, script: &str, env: &[(&str, &str)]) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script);
        let output = tokio::process::Command::new(required_env("GATEWAY_TEST_PYTHON"))
            .arg(&path)
            .env("GATEWAY_URL", &self.url)
            .env("GATEWAY_TOKEN", TOKEN)
            .envs(env.iter().copied())
            .output()
            .await
            .expect("run python");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{script} failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
        let last = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("{script} printed no JSON last ({e}):\n{stdout}\n{stderr}"))
    }

    /// Ray's view of a job (`None` when Ray never saw it).
    pub async fn ray_job(&self, id: &str) -> Option<Value> {
        let resp = self
            .http
            .get(format!("{}/api/jobs/{id}", ray_url()))
            .send()
            .await
            .expect("ray GET");
        if resp.status().as_u16() == 404 {
            return None;
        }
        Some(resp.json().await.expect("ray job JSON"))
    }

    /// Live slot leases under this gateway's prefix.
    pub async fn leases(&self) -> usize {
        let limiter = shared::limiter::RedisLimiter::connect(&self.redis_url, &self.prefix)
            .await
            .expect("limiter");
        limiter.leases_total().await.expect("leases")
    }

    /// Wake-ups still held by the queue: (task data entries, in-flight
    /// entries over all workers). Both return to 0 once jobs are done.
    pub async fn queue_residue(&self) -> (usize, usize) {
        let client = redis::Client::open(self.redis_url.as_str()).expect("redis URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let queue = format!("{}:dispatch", self.prefix);
        let data: usize = redis::cmd("HLEN")
            .arg(format!("{queue}:data"))
            .query_async(&mut conn)
            .await
            .unwrap_or(0);
        let sets: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{queue}:inflight:*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let mut inflight = 0;
        for set in sets {
            inflight += redis::cmd("SCARD")
                .arg(set)
                .query_async::<usize>(&mut conn)
                .await
                .unwrap_or(0);
        }
        (data, inflight)
    }

    pub async fn shutdown(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(15), w.task).await;
        }
        for mut p in self.processes.drain(..) {
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(stop) = self.api_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.api_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        self.pool.close().await;
        drop_database(&self.db_name).await;
        if let Ok(client) = redis::Client::open(self.redis_url.as_str())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.prefix))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
            }
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

async fn status_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let json = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, json)
}

/// A tar with the given files, as `tarfile` would write it.
pub fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, content.as_bytes())
            .expect("tar entry");
    }
    builder.into_inner().expect("tar")
}

/// A binary of the workspace, built by `cargo build --workspace` beside this test.
pub fn binary(name: &str) -> PathBuf {
    let api = PathBuf::from(env!("CARGO_BIN_EXE_gateway-api"));
    let path = api.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// What `client_flow.py` must have seen on any gateway, whatever runs the
/// functions. `failure` is how the runner words the failing function's end.
pub fn assert_client_flow(out: &Value, failure: &str) {
    let text = |key: &str| {
        out[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} missing: {out}"))
            .to_string()
    };
    assert_eq!(out["adder_result"], serde_json::json!({"sum": 42}), "{out}");
    assert_eq!(out["adder_status"], "DONE");
    assert!(text("adder_logs").contains("adding 2 and 40"), "{out}");

    assert_eq!(out["failer_status"], "ERROR");
    let failer_logs = text("failer_logs");
    assert!(
        failer_logs.contains("Traceback")
            && failer_logs.contains("ValueError: boom from the function"),
        "{failer_logs}"
    );
    assert!(
        failer_logs.contains(&format!("[gateway] error: {failure}")),
        "{failer_logs}"
    );
    assert!(
        out["failer_raised"].is_string(),
        "result() of a failed job raises: {out}"
    );

    assert_eq!(out["sleeper_before_stop"], "RUNNING");
    assert_eq!(out["stop_message"], "Job has been stopped.");
    assert_eq!(out["sleeper_status"], "CANCELED");
    assert!(
        text("sleeper_logs").contains("sleeping now"),
        "logs kept after stop: {out}"
    );

    let jobs: Vec<&str> = out["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for key in ["adder_id", "failer_id", "sleeper_id"] {
        assert!(
            jobs.contains(&text(key).as_str()),
            "{key} listed in {jobs:?}"
        );
    }
    assert_eq!(
        out["functions"],
        serde_json::json!(["adder", "failer", "sleeper"])
    );
}
