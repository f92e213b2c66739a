//! Integration tests of `shared::ray` against a REAL Ray head.
//!
//! Set `GATEWAY_TEST_RAY_URL` to the head's dashboard URL (e.g. `http://127.0.0.1:8265`);
//! without it every test here fails on purpose. The head must run the same `python` as the
//! functions (the jobs below need only the standard library).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use shared::artifact::{ArtifactLimits, ray_package_name, tar_to_zip};
use shared::ray::{RayClient, RayError, RayJobInfo, RayJobStatus, SubmitOutcome, SubmitRequest};

const MAIN_PY: &str = r#"
import os
print("hello from the gateway test", flush=True)
with open(os.environ["QS_TEST_OUT"], "w") as f:
    f.write(os.environ["QS_TEST_VALUE"])
with open(os.environ["QS_TEST_OUT"]) as f:
    print("wrote", f.read())
"#;

const SLEEP_PY: &str = r#"
import time
print("sleeping", flush=True)
time.sleep(300)
"#;

/// About 3.3 MB of output, with non-ASCII text (JSON-escaped by Ray), then a last line.
const BIG_PY: &str = r#"
import sys
line = "\u00e9" + "x" * 90 + "\U0001F600\n"
for i in range(32000):
    sys.stdout.write(f"{i:06d} {line}")
print("LAST LINE")
"#;

fn ray_url() -> String {
    match std::env::var("GATEWAY_TEST_RAY_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "GATEWAY_TEST_RAY_URL is not set: these tests need a real Ray head. Start one \
             (e.g. `ray start --head --block --port=6390 --dashboard-port=8275 \
             --dashboard-host=127.0.0.1 --temp-dir=/tmp/rayh`) and set \
             GATEWAY_TEST_RAY_URL=http://127.0.0.1:8275"
        ),
    }
}

fn client() -> RayClient {
    shared::init_crypto();
    RayClient::new(&ray_url(), Duration::from_secs(30)).expect("valid GATEWAY_TEST_RAY_URL")
}

fn head_is_local() -> bool {
    let url = ray_url();
    url.contains("://127.0.0.1") || url.contains("://localhost") || url.contains("://[::1]")
}

/// The test working dir as a Python client would tar it (`arcname="."`), then zipped.
/// `salt` makes the package unique, so that the first upload really uploads.
fn working_dir_zip(salt: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8], mode: u32| {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_entry_type(if name.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        builder.append_data(&mut header, name, data).unwrap();
    };
    add("./", b"", 0o755);
    add("./main.py", MAIN_PY.as_bytes(), 0o644);
    add("./sleep.py", SLEEP_PY.as_bytes(), 0o644);
    add("./big.py", BIG_PY.as_bytes(), 0o755);
    add("./salt.txt", salt.as_bytes(), 0o644);
    let tar = builder.into_inner().unwrap();
    tar_to_zip(&tar, &ArtifactLimits::default()).unwrap()
}

fn fresh_id() -> String {
    format!("qs-test-{}", uuid::Uuid::new_v4())
}

fn request(id: &str, entrypoint: &str, working_dir: &str) -> SubmitRequest {
    SubmitRequest {
        submission_id: id.to_owned(),
        entrypoint: entrypoint.to_owned(),
        working_dir: working_dir.to_owned(),
        env_vars: BTreeMap::new(),
        pip: Vec::new(),
    }
}

async fn wait_for(
    client: &RayClient,
    id: &str,
    timeout: Duration,
    done: impl Fn(&RayJobInfo) -> bool,
) -> RayJobInfo {
    let deadline = Instant::now() + timeout;
    loop {
        let info = client.job(id).await.unwrap().expect("job known to Ray");
        if done(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still {:?} after {timeout:?}: {:?}",
            info.status,
            info.message
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything `tracing` prints in this test binary (at every level), to check that no
/// secret is ever logged. One global subscriber: thread-local ones (`set_default`) miss events
/// when tests run in parallel (tracing's callsite-interest cache is process-wide).
fn captured_traces() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
        captured
    })
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A TCP forwarder to the Ray head that records what clients send, to count HTTP requests.
/// Returns the base URL to use instead of the head's.
fn recording_forwarder() -> (String, Arc<Mutex<Vec<u8>>>) {
    let target = reqwest::Url::parse(&ray_url()).expect("valid GATEWAY_TEST_RAY_URL");
    let target_addr = target.socket_addrs(|| None).unwrap()[0];
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let local = listener.local_addr().unwrap();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let record = sent.clone();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(mut inbound) = inbound else { return };
            let mut outbound = TcpStream::connect(target_addr).unwrap();
            let (mut inbound_read, mut outbound_write) =
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match inbound_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            record.lock().unwrap().extend_from_slice(&buf[..n]);
                            if outbound_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = outbound_write.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut outbound, &mut inbound);
                let _ = inbound.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let mut base = target.clone();
    base.set_port(Some(local.port())).unwrap();
    base.set_host(Some("127.0.0.1")).unwrap();
    (base.to_string(), sent)
}

fn count(haystack: &[u8], needle: &str) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

/// Ray's job monitor looks at a job every second: deleting a job before it has seen the end
/// makes it write the job back as FAILED ("Job supervisor actor died"). Wait it out.
async fn delete_when_settled(client: &RayClient, id: &str) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(client.delete(id).await.unwrap());
}

#[tokio::test]
async fn version_answers() {
    let client = client();
    let version = client.version().await.unwrap();
    assert!(version.starts_with("2."), "{version}");
    let info = client.version_info().await.unwrap();
    assert_eq!(info.ray_version, version);
    let session = info.session_name.expect("a session name");
    assert!(session.starts_with("session_"), "{session}");
    assert_eq!(
        client.version_info().await.unwrap().session_name,
        Some(session)
    );
}

#[tokio::test]
async fn ensure_package_uploads_once() {
    let (base, sent) = recording_forwarder();
    shared::init_crypto();
    let client = RayClient::new(&base, Duration::from_secs(30)).unwrap();
    let zip = working_dir_zip(&uuid::Uuid::new_v4().to_string());
    let name = ray_package_name(&zip);
    let get = format!("GET /api/packages/gcs/{name} HTTP/1.1");
    let put = format!("PUT /api/packages/gcs/{name} HTTP/1.1");

    let first = client.ensure_package(&zip).await.unwrap();
    assert_eq!(first, format!("gcs://{name}"));
    let after_first = sent.lock().unwrap().clone();
    assert_eq!(
        (count(&after_first, &get), count(&after_first, &put)),
        (1, 1)
    );

    let second = client.ensure_package(&zip).await.unwrap();
    assert_eq!(second, first);
    let after_second = sent.lock().unwrap().clone();
    assert_eq!(
        (count(&after_second, &get), count(&after_second, &put)),
        (2, 1),
        "the second call is a single GET"
    );
}

#[tokio::test]
async fn job_runs_to_success_and_is_idempotent() {
    let captured = captured_traces();
    let client = client();
    let working_dir = client
        .ensure_package(&working_dir_zip("main"))
        .await
        .unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out_file = out_dir.path().join("result.txt");
    let secret = format!("secret-{}", uuid::Uuid::new_v4());

    let id = fresh_id();
    let mut req = request(&id, "python main.py", &working_dir);
    req.env_vars
        .insert("QS_TEST_OUT".into(), out_file.display().to_string());
    req.env_vars.insert("QS_TEST_VALUE".into(), secret.clone());

    assert_eq!(client.submit(&req).await.unwrap(), SubmitOutcome::Submitted);
    let started = Instant::now();
    let info = wait_for(&client, &id, Duration::from_secs(120), |i| {
        i.status.is_terminal()
    })
    .await;
    assert_eq!(info.status, RayJobStatus::Succeeded, "{:?}", info.message);
    eprintln!("submit → SUCCEEDED observed after {:?}", started.elapsed());
    let (start, end) = (info.start_time_ms.unwrap(), info.end_time_ms.unwrap());
    assert!(start > 1_600_000_000_000 && end >= start, "{start} {end}");
    assert_eq!(info.driver_exit_code, Some(0));

    let logs = client.logs_tail(&id, 64 * 1024).await.unwrap();
    assert!(logs.contains("hello from the gateway test\n"), "{logs}");
    assert!(logs.contains(&format!("wrote {secret}")), "{logs}");
    assert!(!logs.starts_with("[... log truncated"));
    if head_is_local() {
        assert_eq!(std::fs::read_to_string(&out_file).unwrap(), secret);
    }

    // The same submission id again: recognised, not an error, and nothing re-runs.
    assert_eq!(
        client.submit(&req).await.unwrap(),
        SubmitOutcome::AlreadyExists
    );
    let again = client.job(&id).await.unwrap().unwrap();
    assert_eq!(again, info);

    // A finished job cannot be stopped.
    assert!(!client.stop(&id).await.unwrap());

    // Secrets never reach the logs of the gateway.
    let traces = captured.text();
    assert!(
        traces.contains(&id),
        "spans carry the submission id: {traces}"
    );
    assert!(!traces.contains(&secret), "a secret was logged: {traces}");

    // Deleting forgets the job (and its env) in Ray, for good once Ray's monitor has settled.
    delete_when_settled(&client, &id).await;
    assert_eq!(client.job(&id).await.unwrap(), None);
    assert!(!client.delete(&id).await.unwrap());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(client.job(&id).await.unwrap(), None, "the job came back");
}

#[tokio::test]
async fn unknown_ids() {
    let client = client();
    let id = fresh_id();
    assert_eq!(client.job(&id).await.unwrap(), None);
    assert!(!client.stop(&id).await.unwrap());
    match client.logs_tail(&id, 1024).await {
        Err(error @ RayError::Http { status: 404, .. }) => assert!(!error.is_transient()),
        other => panic!("expected HTTP 404, got {other:?}"),
    }
    // Odd characters in an id are escaped, not interpreted as a path.
    assert_eq!(client.job("../version").await.unwrap(), None);
    assert_eq!(client.job("..").await.unwrap(), None);
    assert_eq!(client.job("").await.unwrap(), None);
    assert!(!client.stop("..").await.unwrap());
}

#[tokio::test]
async fn sleeping_job_is_stopped() {
    let client = client();
    let working_dir = client
        .ensure_package(&working_dir_zip("sleep"))
        .await
        .unwrap();
    let id = fresh_id();
    let req = request(&id, "python sleep.py", &working_dir);
    assert_eq!(client.submit(&req).await.unwrap(), SubmitOutcome::Submitted);
    wait_for(&client, &id, Duration::from_secs(120), |i| {
        i.status == RayJobStatus::Running || i.status.is_terminal()
    })
    .await;
    assert!(client.stop(&id).await.unwrap());
    let info = wait_for(&client, &id, Duration::from_secs(60), |i| {
        i.status.is_terminal()
    })
    .await;
    assert_eq!(info.status, RayJobStatus::Stopped, "{:?}", info.message);
    assert!(info.end_time_ms.is_some());
    assert_eq!(info.driver_exit_code, None);
    assert!(
        !client.stop(&id).await.unwrap(),
        "a second stop stops nothing"
    );
    delete_when_settled(&client, &id).await;
}

#[tokio::test]
async fn huge_log_gives_a_bounded_tail() {
    let client = client();
    let working_dir = client
        .ensure_package(&working_dir_zip("big"))
        .await
        .unwrap();
    let id = fresh_id();
    let req = request(&id, "python big.py", &working_dir);
    assert_eq!(client.submit(&req).await.unwrap(), SubmitOutcome::Submitted);
    let info = wait_for(&client, &id, Duration::from_secs(120), |i| {
        i.status.is_terminal()
    })
    .await;
    assert_eq!(info.status, RayJobStatus::Succeeded, "{:?}", info.message);

    let max = 64 * 1024;
    let logs = client.logs_tail(&id, max).await.unwrap();
    let (marker, tail) = logs.split_once('\n').unwrap();
    assert_eq!(
        marker,
        format!(
            "[... log truncated: showing the last {} bytes ...]",
            tail.len()
        )
    );
    assert!(tail.len() <= max && tail.len() + 3 >= max, "{}", tail.len());
    assert!(
        tail.ends_with("LAST LINE\n"),
        "{:?}",
        &tail[tail.len().saturating_sub(200)..]
    );
    assert!(tail.contains("031999 \u{e9}xxx"), "non-ASCII text decoded");
    assert!(tail.contains("\u{1F600}\n"), "surrogate pairs decoded");

    // With room for everything: the whole log, no marker.
    let whole = client.logs_tail(&id, 8 * 1024 * 1024).await.unwrap();
    assert!(!whole.starts_with("[... log truncated"));
    assert!(whole.len() > 3_000_000, "{}", whole.len());
    assert!(whole.contains("\n000000 \u{e9}x"));
    assert!(whole.ends_with(tail));
    delete_when_settled(&client, &id).await;
}
