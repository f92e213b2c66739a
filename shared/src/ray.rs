//! Client for Ray's Jobs REST API (the dashboard's HTTP port), without the Ray Python SDK.
//!
//! Behaviour of Ray 2.60 that this client relies on (checked against a real head):
//! - `GET /api/packages/gcs/<name>` answers 404 for a missing package and 200 (empty body) for
//!   a present one; either way it *pins* the URI for `RAY_RUNTIME_ENV_URI_PIN_EXPIRATION_S`
//!   (600 s by default) so that the following `PUT` and submission cannot race a clean-up.
//!   `PUT` takes the raw zip; the dashboard refuses bodies above 100 MiB. Packages live in the
//!   head's in-memory GCS: they outlived their pins here (not deleted 40 s after a 5 s pin
//!   expired, with or without a finished job using them) but are gone after a head restart
//!   (same URL, new `session_name` in `/api/version`). A submission naming a missing package
//!   is still accepted (200); the job then FAILS with `error_type`
//!   `RUNTIME_ENV_SETUP_FAILURE`. So call [`RayClient::ensure_package`] (one GET when present)
//!   before each submission, or key any cache by [`RayVersion::session_name`].
//! - `runtime_env.working_dir` set to a plain directory is *accepted* by `POST /api/jobs/`;
//!   the job then fails ("… is not a valid URI").
//! - `POST /api/jobs/` (the trailing slash matters: `/api/jobs` is a 404) → 200
//!   `{"job_id", "submission_id"}`. Re-using a `submission_id` answers **500** whose text
//!   contains "Job with submission_id <id> already exists" (the job agent's 400 wrapped by the
//!   head). But once a job is deleted (`DELETE /api/jobs/<id>`), the same id can be submitted
//!   again and runs again; and a delete within 1–2 s of the job's end is undone by
//!   Ray's job monitor, which writes the job back as FAILED (see [`RayClient::delete`]).
//! - `GET /api/jobs/<id>` → 404 with a plain-text body for an unknown id. `start_time` is set
//!   at submission (already while PENDING); `driver_exit_code` stays null for a stopped job.
//!   The answer includes `runtime_env.env_vars` in clear: it is never logged nor put into an
//!   error here.
//! - `POST /api/jobs/<id>/stop` → `{"stopped": true}` once, `false` for a finished job, 404 for
//!   an unknown id.
//! - `GET /api/jobs/<id>/logs` → `{"logs": "<whole driver log>"}` in one JSON document, which
//!   is why [`RayClient::logs_tail`] stream-decodes it keeping only a bounded tail. The log
//!   starts with Ray's own lines ("Runtime env is setting up.", "Running entrypoint for job …").

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

/// How many bytes of an error answer are read (to find "already exists") at most.
const ERROR_BODY_READ_LIMIT: usize = 64 * 1024;
/// How many bytes of an error answer are kept in [`RayError::Http`].
const ERROR_BODY_KEEP: usize = 2 * 1024;
/// Env var values shorter than this are not redacted from error texts (too likely to match
/// unrelated text); tokens and keys are far longer.
const REDACT_MIN_LEN: usize = 8;

/// A failed call to the Ray dashboard.
#[derive(thiserror::Error, Debug)]
pub enum RayError {
    /// No answer: connection refused or reset, DNS failure, timeout, body cut short; also an
    /// unusable base URL given to [`RayClient::new`].
    #[error("Ray dashboard unreachable: {0}")]
    Unreachable(String),
    /// The dashboard answered with an unexpected HTTP status. `body` is the start of its
    /// answer (at most 2 KiB).
    #[error("Ray dashboard answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// The dashboard answered 2xx with something that is not what the API documents.
    #[error("unexpected answer from the Ray dashboard: {0}")]
    Decode(String),
}

impl RayError {
    /// True when trying again later may succeed: no answer (including timeouts), a 5xx other
    /// than "already exists", 408 and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            RayError::Unreachable(_) => true,
            RayError::Http { status, body } => {
                (*status >= 500 && !body.contains("already exists"))
                    || *status == 408
                    || *status == 429
            }
            RayError::Decode(_) => false,
        }
    }
}

/// A job submission. `Debug` shows the env var names, never their values.
#[derive(Clone)]
pub struct SubmitRequest {
    /// Our id for the job (the gateway job id): makes the submission idempotent.
    pub submission_id: String,
    /// Shell command, e.g. `python main.py`.
    pub entrypoint: String,
    /// `gcs://_ray_pkg_<hash>.zip`, from [`RayClient::ensure_package`].
    pub working_dir: String,
    /// Environment of the entrypoint (may hold secrets).
    pub env_vars: BTreeMap<String, String>,
    /// pip requirements; empty = no `pip` in the runtime env.
    pub pip: Vec<String>,
}

impl std::fmt::Debug for SubmitRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmitRequest")
            .field("submission_id", &self.submission_id)
            .field("entrypoint", &self.entrypoint)
            .field("working_dir", &self.working_dir)
            .field("env_vars", &self.env_vars.keys().collect::<Vec<_>>())
            .field("pip", &self.pip)
            .finish()
    }
}

/// What [`RayClient::submit`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Ray accepted a new job.
    Submitted,
    /// A job with this submission id already exists (an earlier attempt went through): look
    /// it up with [`RayClient::job`].
    AlreadyExists,
}

/// Ray's job status. Anything Ray may add later reads as `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RayJobStatus {
    Pending,
    Running,
    Stopped,
    Succeeded,
    Failed,
    Unknown,
}

impl RayJobStatus {
    fn parse(status: &str) -> Self {
        match status {
            "PENDING" => Self::Pending,
            "RUNNING" => Self::Running,
            "STOPPED" => Self::Stopped,
            "SUCCEEDED" => Self::Succeeded,
            "FAILED" => Self::Failed,
            _ => Self::Unknown,
        }
    }

    /// STOPPED, SUCCEEDED or FAILED: Ray will not change it any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Stopped | Self::Succeeded | Self::Failed)
    }
}

/// The part of `GET /api/jobs/<id>` that the gateway uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RayJobInfo {
    pub status: RayJobStatus,
    pub message: Option<String>,
    /// Submission time (Ray sets it while PENDING already), ms since the epoch.
    pub start_time_ms: Option<i64>,
    /// End time, ms since the epoch; set once terminal.
    pub end_time_ms: Option<i64>,
    /// Exit code of the entrypoint; null for a job that was stopped or never started.
    pub driver_exit_code: Option<i32>,
}

/// The JSON of `GET /api/jobs/<id>`, reduced to the fields we read: deserialising only these
/// keeps `runtime_env` (secrets) out of any error message.
#[derive(Deserialize)]
struct JobDetails {
    status: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    start_time: Option<serde_json::Number>,
    #[serde(default)]
    end_time: Option<serde_json::Number>,
    #[serde(default)]
    driver_exit_code: Option<serde_json::Number>,
}

fn number_to_i64(number: Option<serde_json::Number>) -> Option<i64> {
    let number = number?;
    number
        .as_i64()
        .or_else(|| number.as_f64().map(|f| f as i64))
}

/// What `GET /api/version` tells about a head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RayVersion {
    /// e.g. `2.60.0`.
    pub ray_version: String,
    /// e.g. `session_2026-12-03_13-24-08_308779_11400`; new at every head start.
    pub session_name: Option<String>,
}

/// A client for one Ray head's dashboard. Cheap to clone (shares the connection pool).
#[derive(Clone, Debug)]
pub struct RayClient {
    http: reqwest::Client,
    base: Url,
    base_str: String,
}

impl RayClient {
    /// `base_url` is the dashboard's address, e.g. `http://127.0.0.1:8265` (a path prefix is
    /// kept, for a dashboard behind a proxy). `request_timeout` bounds every call, body
    /// included; connecting is bounded by the smaller of it and 10 s. System proxy settings are
    /// ignored: the dashboard is an internal service. Installs the rustls crypto provider if
    /// none is installed yet ([`crate::init_crypto`]).
    pub fn new(base_url: &str, request_timeout: Duration) -> Result<Self, RayError> {
        let trimmed = base_url.trim().trim_end_matches('/');
        let invalid = |why: String| {
            RayError::Unreachable(format!("invalid Ray dashboard URL `{base_url}`: {why}"))
        };
        let base = Url::parse(trimmed).map_err(|e| invalid(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https".to_owned()));
        }
        if base.cannot_be_a_base() || base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("expected scheme://host[:port][/path]".to_owned()));
        }
        crate::init_crypto();
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(10)))
            .no_proxy()
            .user_agent(concat!("qs-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RayError::Unreachable(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            base_str: trimmed.to_owned(),
        })
    }

    /// The dashboard URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_str
    }

    /// `GET /api/version`: Ray's version, e.g. `2.60.0`. A cheap liveness check.
    pub async fn version(&self) -> Result<String, RayError> {
        Ok(self.version_info().await?.ray_version)
    }

    /// `GET /api/version` with the head's session name, which changes when the head restarts
    /// (and with it every package and job it held): use it to key anything cached per head.
    #[tracing::instrument(name = "ray.version", skip_all, fields(ray = %self.base_str))]
    pub async fn version_info(&self) -> Result<RayVersion, RayError> {
        #[derive(Deserialize)]
        struct Version {
            ray_version: String,
            #[serde(default)]
            session_name: Option<String>,
        }
        let response = self.send(Method::GET, &["api", "version"], None).await?;
        let response = expect_ok(response).await?;
        let version: Version = decode_json(response, "version").await?;
        Ok(RayVersion {
            ray_version: version.ray_version,
            session_name: version.session_name,
        })
    }

    /// Makes sure the zip is stored in Ray's GCS under its content-addressed name and returns
    /// its `gcs://` URI for `working_dir`. `GET` first (which also pins it for 10 minutes), and
    /// `PUT` the bytes only when that answers 404.
    #[tracing::instrument(name = "ray.ensure_package", skip_all, fields(package))]
    pub async fn ensure_package(&self, zip: &[u8]) -> Result<String, RayError> {
        let name = crate::artifact::ray_package_name(zip);
        tracing::Span::current().record("package", name.as_str());
        let path = ["api", "packages", "gcs", name.as_str()];
        let response = self.send(Method::GET, &path, None).await?;
        match response.status() {
            StatusCode::OK => {
                tracing::debug!("package already in GCS");
            }
            StatusCode::NOT_FOUND => {
                let body = bytes::Bytes::copy_from_slice(zip);
                let response = self.send(Method::PUT, &path, Some(body)).await?;
                expect_ok(response).await?;
                tracing::debug!(bytes = zip.len(), "package uploaded");
            }
            _ => return Err(http_error(response, &[]).await),
        }
        Ok(format!("gcs://{name}"))
    }

    /// `POST /api/jobs/`. A submission id that Ray already knows gives
    /// [`SubmitOutcome::AlreadyExists`], not an error, so a retried dispatch is safe.
    #[tracing::instrument(name = "ray.submit", skip_all, fields(submission_id = %req.submission_id))]
    pub async fn submit(&self, req: &SubmitRequest) -> Result<SubmitOutcome, RayError> {
        if !usable_id(&req.submission_id) {
            return Err(RayError::Http {
                status: 400,
                body: "not sent: a submission id must be non-empty and not `.` or `..`".into(),
            });
        }
        let mut runtime_env = serde_json::Map::new();
        runtime_env.insert("working_dir".into(), req.working_dir.clone().into());
        runtime_env.insert(
            "env_vars".into(),
            serde_json::to_value(&req.env_vars).unwrap_or_default(),
        );
        if !req.pip.is_empty() {
            runtime_env.insert("pip".into(), req.pip.clone().into());
        }
        let body = serde_json::json!({
            "entrypoint": req.entrypoint,
            "submission_id": req.submission_id,
            "runtime_env": runtime_env,
        });
        let body = bytes::Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let response = self
            .send(Method::POST, &["api", "jobs", ""], Some(body))
            .await?;
        if response.status().is_success() {
            tracing::debug!("job submitted");
            return Ok(SubmitOutcome::Submitted);
        }
        // The submission id is no secret (it is also ENV_JOB_ID_GATEWAY) and
        // must stay readable to recognise "already exists".
        let secrets: Vec<&str> = req
            .env_vars
            .values()
            .map(String::as_str)
            .filter(|v| *v != req.submission_id)
            .collect();
        match http_error(response, &secrets).await {
            RayError::Http { status, body }
                if (400..600).contains(&status)
                    && body.contains("already exists")
                    && body.contains(req.submission_id.as_str()) =>
            {
                tracing::debug!("job already submitted");
                Ok(SubmitOutcome::AlreadyExists)
            }
            error => Err(error),
        }
    }

    /// `GET /api/jobs/<id>`; `None` if Ray does not know the id.
    #[tracing::instrument(name = "ray.job", skip_all, fields(submission_id = %submission_id))]
    pub async fn job(&self, submission_id: &str) -> Result<Option<RayJobInfo>, RayError> {
        if !usable_id(submission_id) {
            return Ok(None);
        }
        let response = self
            .send(Method::GET, &["api", "jobs", submission_id], None)
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = expect_ok(response).await?;
        let details: JobDetails = decode_json(response, "job").await?;
        Ok(Some(RayJobInfo {
            status: RayJobStatus::parse(&details.status),
            message: details.message,
            start_time_ms: number_to_i64(details.start_time),
            end_time_ms: number_to_i64(details.end_time),
            driver_exit_code: number_to_i64(details.driver_exit_code)
                .and_then(|code| i32::try_from(code).ok()),
        }))
    }

    /// The last `max_bytes` bytes of the job's log (`GET /api/jobs/<id>/logs`), decoded while
    /// the answer streams in, so memory stays bounded whatever the log's size. A truncated log
    /// starts with the line `[... log truncated: showing the last N bytes ...]` and the kept
    /// part starts on a character boundary. An unknown id is `RayError::Http` with status 404.
    #[tracing::instrument(name = "ray.logs", skip_all, fields(submission_id = %submission_id))]
    pub async fn logs_tail(
        &self,
        submission_id: &str,
        max_bytes: usize,
    ) -> Result<String, RayError> {
        if !usable_id(submission_id) {
            return Err(RayError::Http {
                status: 404,
                body: format!("not sent: no job can have the id `{submission_id}`"),
            });
        }
        let response = self
            .send(Method::GET, &["api", "jobs", submission_id, "logs"], None)
            .await?;
        let response = expect_ok(response).await?;
        let mut decoder = LogsTailDecoder::new(max_bytes);
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(transport_error)?;
            decoder.feed(&chunk)?;
        }
        let (text, total) = decoder.finish_with_total()?;
        tracing::debug!(log_bytes = total, "logs fetched");
        Ok(text)
    }

    /// `POST /api/jobs/<id>/stop`: true if Ray stopped the job now; false if it had already
    /// ended or Ray does not know the id.
    #[tracing::instrument(name = "ray.stop", skip_all, fields(submission_id = %submission_id))]
    pub async fn stop(&self, submission_id: &str) -> Result<bool, RayError> {
        #[derive(Deserialize)]
        struct Stopped {
            stopped: bool,
        }
        if !usable_id(submission_id) {
            return Ok(false);
        }
        let response = self
            .send(Method::POST, &["api", "jobs", submission_id, "stop"], None)
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        let response = expect_ok(response).await?;
        let stopped: Stopped = decode_json(response, "stop").await?;
        Ok(stopped.stopped)
    }

    /// `DELETE /api/jobs/<id>`: forgets a finished job (its info, which holds the env vars in
    /// clear). True if deleted, false if Ray does not know the id. Ray refuses to delete a job
    /// that is not terminal (HTTP 500).
    ///
    /// Two traps (Ray 2.60): delete only a few seconds (≥ 3 s) after the job became terminal:
    /// Ray's job monitor checks each job every second, and if the job's info is gone before it
    /// has seen the end, it writes the job back as FAILED ("Job supervisor actor died"). And
    /// after a delete the same submission id is accepted, and runs, again: delete only jobs
    /// whose end is stored on our side.
    #[tracing::instrument(name = "ray.delete", skip_all, fields(submission_id = %submission_id))]
    pub async fn delete(&self, submission_id: &str) -> Result<bool, RayError> {
        #[derive(Deserialize)]
        struct Deleted {
            deleted: bool,
        }
        if !usable_id(submission_id) {
            return Ok(false);
        }
        let response = self
            .send(Method::DELETE, &["api", "jobs", submission_id], None)
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        let response = expect_ok(response).await?;
        let deleted: Deleted = decode_json(response, "delete").await?;
        Ok(deleted.deleted)
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<bytes::Bytes>,
    ) -> Result<reqwest::Response, RayError> {
        let mut request = self.http.request(method, self.url(segments));
        if let Some(body) = body {
            request = request.body(body);
            if segments.first() == Some(&"api") && segments.get(1) == Some(&"jobs") {
                request = request.header(reqwest::header::CONTENT_TYPE, "application/json");
            }
        }
        request.send().await.map_err(transport_error)
    }
}

/// An id that can travel as one URL path segment: `.` and `..` would be taken as "this" and
/// "parent" by URL normalisation, and an empty id would address the job list.
fn usable_id(id: &str) -> bool {
    !matches!(id, "" | "." | "..")
}

fn transport_error(error: reqwest::Error) -> RayError {
    use std::error::Error as _;
    let mut message = if error.is_timeout() {
        format!("timed out: {error}")
    } else {
        error.to_string()
    };
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    RayError::Unreachable(message)
}

async fn expect_ok(response: reqwest::Response) -> Result<reqwest::Response, RayError> {
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(http_error(response, &[]).await)
    }
}

/// Reads the start of an error answer (bounded) into [`RayError::Http`], with the given
/// secrets replaced by `[redacted]`.
async fn http_error(response: reqwest::Response, secrets: &[&str]) -> RayError {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                let room = ERROR_BODY_READ_LIMIT - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= ERROR_BODY_READ_LIMIT {
                    break;
                }
            }
            Err(_) => break, // keep what arrived: the status is the main information
        }
    }
    let mut text = String::from_utf8_lossy(&body).into_owned();
    for secret in secrets.iter().filter(|s| s.len() >= REDACT_MIN_LEN) {
        text = text.replace(secret, "[redacted]");
    }
    // "already exists" must survive the cut: Ray's traceback puts it at the end.
    let body = if text.len() > ERROR_BODY_KEEP {
        let keep_from = text.ceil_char_boundary(text.len() - ERROR_BODY_KEEP);
        format!("…{}", &text[keep_from..])
    } else {
        text
    };
    RayError::Http {
        status,
        body: body.trim().to_owned(),
    }
}

async fn decode_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    what: &str,
) -> Result<T, RayError> {
    let bytes = response.bytes().await.map_err(transport_error)?;
    serde_json::from_slice(&bytes).map_err(|e| RayError::Decode(format!("{what} answer: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Streaming decoder for `{"logs": "..."}`.

/// Incremental decoder of Ray's `{"logs": "<text>"}` answer that keeps only the last
/// `max_bytes` bytes of the decoded text, whatever the answer's size and however it is cut
/// into chunks (escapes, `\uXXXX` and surrogate pairs split across chunks included). Other
/// keys of the object are skipped.
#[derive(Debug)]
pub struct LogsTailDecoder {
    state: State,
    string: StringDecoder,
    skipper: Skipper,
    /// The current key, only as far as needed to recognise `logs`.
    key: Vec<u8>,
    key_len: usize,
    found_logs: bool,
    tail: TailBuffer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before `{`.
    Start,
    /// After `{` (`first`) or `,`: a key, or `}` if first.
    KeyOrEnd {
        first: bool,
    },
    Key,
    Colon,
    Value,
    /// Inside the `logs` string.
    Logs,
    /// Inside another value.
    Skip,
    CommaOrEnd,
    Done,
}

const LOGS_KEY: &[u8] = b"logs";

impl LogsTailDecoder {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            state: State::Start,
            string: StringDecoder::default(),
            skipper: Skipper::default(),
            key: Vec::with_capacity(LOGS_KEY.len()),
            key_len: 0,
            found_logs: false,
            tail: TailBuffer::new(max_bytes),
        }
    }

    /// Feeds the next piece of the answer.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), RayError> {
        while !chunk.is_empty() {
            if self.state == State::Logs && self.string.is_plain() {
                // Fast path: copy a run of plain characters at once.
                let run = chunk
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\')
                    .unwrap_or(chunk.len());
                if run > 0 {
                    self.tail.extend(&chunk[..run]);
                    chunk = &chunk[run..];
                    continue;
                }
            }
            let byte = chunk[0];
            chunk = &chunk[1..];
            self.step(byte)?;
        }
        Ok(())
    }

    /// The decoded tail, with the truncation marker line when the text was longer than
    /// `max_bytes`. Fails if the answer was incomplete or had no `logs` string.
    pub fn finish(self) -> Result<String, RayError> {
        self.finish_with_total().map(|(text, _)| text)
    }

    /// Like [`Self::finish`], also returning the full decoded length in bytes.
    pub fn finish_with_total(self) -> Result<(String, u64), RayError> {
        if self.state != State::Done {
            return Err(malformed("the answer ended early"));
        }
        if !self.found_logs {
            return Err(malformed("no `logs` string in the answer"));
        }
        let total = self.tail.total;
        let truncated = total > self.tail.buf.len() as u64;
        Ok((
            crate::logs::render_tail(self.tail.buf.into(), truncated),
            total,
        ))
    }

    fn step(&mut self, byte: u8) -> Result<(), RayError> {
        let is_space = matches!(byte, b' ' | b'\t' | b'\n' | b'\r');
        match self.state {
            State::Start => match byte {
                b'{' => self.state = State::KeyOrEnd { first: true },
                _ if is_space => {}
                _ => return Err(malformed("the answer is not a JSON object")),
            },
            State::KeyOrEnd { first } => match byte {
                b'"' => {
                    self.key.clear();
                    self.key_len = 0;
                    self.string = StringDecoder::default();
                    self.state = State::Key;
                }
                b'}' if first => self.state = State::Done,
                _ if is_space => {}
                _ => return Err(malformed("expected a key")),
            },
            State::Key => {
                let (key, key_len) = (&mut self.key, &mut self.key_len);
                let ended = self.string.byte(byte, &mut |bytes: &[u8]| {
                    *key_len += bytes.len();
                    if *key_len <= LOGS_KEY.len() {
                        key.extend_from_slice(bytes);
                    }
                })?;
                if ended {
                    self.state = State::Colon;
                }
            }
            State::Colon => match byte {
                b':' => self.state = State::Value,
                _ if is_space => {}
                _ => return Err(malformed("expected `:`")),
            },
            State::Value => {
                if is_space {
                    return Ok(());
                }
                let is_logs = self.key_len == LOGS_KEY.len() && self.key == LOGS_KEY;
                if is_logs && byte == b'"' {
                    if self.found_logs {
                        return Err(malformed("two `logs` strings"));
                    }
                    self.found_logs = true;
                    self.string = StringDecoder::default();
                    self.state = State::Logs;
                } else {
                    // `"logs": null` counts as an empty log.
                    if is_logs && byte == b'n' && !self.found_logs {
                        self.found_logs = true;
                    }
                    self.skipper = Skipper::start(byte)?;
                    self.state = State::Skip;
                }
            }
            State::Logs => {
                let tail = &mut self.tail;
                if self
                    .string
                    .byte(byte, &mut |bytes: &[u8]| tail.extend(bytes))?
                {
                    self.state = State::CommaOrEnd;
                }
            }
            State::Skip => match self.skipper.byte(byte) {
                SkipStep::More => {}
                SkipStep::EndedWith => self.state = State::CommaOrEnd,
                SkipStep::EndedBefore => {
                    self.state = State::CommaOrEnd;
                    self.step(byte)?;
                }
            },
            State::CommaOrEnd => match byte {
                b',' => self.state = State::KeyOrEnd { first: false },
                b'}' => self.state = State::Done,
                _ if is_space => {}
                _ => return Err(malformed("expected `,` or `}`")),
            },
            State::Done => {
                if !is_space {
                    return Err(malformed("text after the JSON object"));
                }
            }
        }
        Ok(())
    }
}

fn malformed(why: &str) -> RayError {
    RayError::Decode(format!("logs answer: {why}"))
}

/// The last `cap` bytes written, and how many were written in all.
#[derive(Debug)]
struct TailBuffer {
    buf: VecDeque<u8>,
    cap: usize,
    total: u64,
}

impl TailBuffer {
    fn new(cap: usize) -> Self {
        Self {
            buf: VecDeque::new(),
            cap,
            total: 0,
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if bytes.len() >= self.cap {
            self.buf.clear();
            self.buf.extend(&bytes[bytes.len() - self.cap..]);
            return;
        }
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(bytes);
    }
}

/// Decodes the inside of a JSON string, byte by byte.
#[derive(Debug, Default)]
struct StringDecoder {
    escape: Escape,
    /// A high surrogate waiting for its low half.
    high: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    Backslash,
    Hex {
        value: u32,
        digits: u8,
    },
}

const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();

impl StringDecoder {
    /// No escape or surrogate pending: plain bytes can be copied through.
    fn is_plain(&self) -> bool {
        self.escape == Escape::None && self.high.is_none()
    }

    /// Decodes one byte after the opening quote; true when it was the closing quote.
    fn byte(&mut self, byte: u8, out: &mut impl FnMut(&[u8])) -> Result<bool, RayError> {
        match self.escape {
            Escape::None => {
                if byte != b'\\' && self.high.take().is_some() {
                    out(REPLACEMENT); // a high surrogate not followed by `\u`
                }
                match byte {
                    b'"' => return Ok(true),
                    b'\\' => self.escape = Escape::Backslash,
                    _ => out(&[byte]),
                }
            }
            Escape::Backslash => {
                if byte == b'u' {
                    self.escape = Escape::Hex {
                        value: 0,
                        digits: 0,
                    };
                    return Ok(false);
                }
                if self.high.take().is_some() {
                    out(REPLACEMENT);
                }
                let decoded = match byte {
                    b'"' => b'"',
                    b'\\' => b'\\',
                    b'/' => b'/',
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    _ => return Err(malformed("invalid escape in a string")),
                };
                out(&[decoded]);
                self.escape = Escape::None;
            }
            Escape::Hex { value, digits } => {
                let digit = char::from(byte)
                    .to_digit(16)
                    .ok_or_else(|| malformed("invalid \\u escape"))?;
                let value = value * 16 + digit;
                if digits == 3 {
                    self.escape = Escape::None;
                    self.code_unit(value, out);
                } else {
                    self.escape = Escape::Hex {
                        value,
                        digits: digits + 1,
                    };
                }
            }
        }
        Ok(false)
    }

    fn code_unit(&mut self, unit: u32, out: &mut impl FnMut(&[u8])) {
        const HIGH: std::ops::RangeInclusive<u32> = 0xD800..=0xDBFF;
        const LOW: std::ops::RangeInclusive<u32> = 0xDC00..=0xDFFF;
        if let Some(high) = self.high.take() {
            if LOW.contains(&unit) {
                let code = 0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00);
                let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
                out(c.encode_utf8(&mut [0; 4]).as_bytes());
                return;
            }
            out(REPLACEMENT);
        }
        if HIGH.contains(&unit) {
            self.high = Some(unit);
        } else {
            let c = char::from_u32(unit).unwrap_or(char::REPLACEMENT_CHARACTER);
            out(c.encode_utf8(&mut [0; 4]).as_bytes());
        }
    }
}

/// Skips one JSON value that is not the `logs` string.
#[derive(Debug, Default)]
struct Skipper {
    depth: u32,
    in_string: bool,
    escaped: bool,
    scalar: bool,
}

enum SkipStep {
    More,
    /// The value ended with this byte.
    EndedWith,
    /// The value ended just before this byte, which belongs to what follows.
    EndedBefore,
}

impl Skipper {
    fn start(first: u8) -> Result<Self, RayError> {
        let mut skipper = Self::default();
        match first {
            b'"' => skipper.in_string = true,
            b'{' | b'[' => skipper.depth = 1,
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => skipper.scalar = true,
            _ => return Err(malformed("expected a value")),
        }
        Ok(skipper)
    }

    fn byte(&mut self, byte: u8) -> SkipStep {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    return SkipStep::EndedWith;
                }
            }
            return SkipStep::More;
        }
        if self.scalar {
            return match byte {
                b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r' => SkipStep::EndedBefore,
                _ => SkipStep::More,
            };
        }
        match byte {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    return SkipStep::EndedWith;
                }
            }
            _ => {}
        }
        SkipStep::More
    }
}

/// One pooled client per Ray head (a client holds its connections; making
/// one per call would reconnect every time).
#[derive(Debug)]
pub struct RayClients {
    timeout: Duration,
    clients: std::sync::Mutex<std::collections::HashMap<String, RayClient>>,
}

impl RayClients {
    pub fn new(timeout: Duration) -> Self {
        RayClients {
            timeout,
            clients: Default::default(),
        }
    }

    /// The client for the head at `base_url`.
    pub fn get(&self, base_url: &str) -> Result<RayClient, RayError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| RayError::Unreachable("client cache poisoned".into()))?;
        if let Some(c) = clients.get(base_url) {
            return Ok(c.clone());
        }
        let client = RayClient::new(base_url, self.timeout)?;
        clients.insert(base_url.to_string(), client.clone());
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_chunks(json: &[u8], max: usize, sizes: &mut dyn FnMut() -> usize) -> String {
        let mut decoder = LogsTailDecoder::new(max);
        let mut rest = json;
        while !rest.is_empty() {
            let n = sizes().clamp(1, rest.len());
            decoder.feed(&rest[..n]).unwrap();
            rest = &rest[n..];
        }
        decoder.finish().unwrap()
    }

    fn decode(json: &str, max: usize) -> String {
        decode_in_chunks(json.as_bytes(), max, &mut || usize::MAX)
    }

    /// Every way of cutting `json` gives the same result as feeding it whole.
    fn assert_chunking_invariant(json: &str, max: usize) -> String {
        let whole = decode(json, max);
        assert_eq!(
            decode_in_chunks(json.as_bytes(), max, &mut || 1),
            whole,
            "byte by byte"
        );
        // A small deterministic generator (xorshift), so failures can be replayed.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..50 {
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % 17) as usize + 1
            };
            assert_eq!(
                decode_in_chunks(json.as_bytes(), max, &mut next),
                whole,
                "random chunks"
            );
        }
        whole
    }

    #[test]
    fn decodes_plain_and_escaped_text() {
        let json = r#"{"logs": "line 1\nsaid \"hi\" \\ back\/slash\ttab\r\n\u00e9\u20ac\ud83d\ude00 end"}"#;
        let text = assert_chunking_invariant(json, 1 << 20);
        assert_eq!(text, "line 1\nsaid \"hi\" \\ back/slash\ttab\r\né€😀 end");
    }

    #[test]
    fn matches_serde_json_on_python_style_output() {
        // What Python's json.dumps (ensure_ascii) makes of a mixed log.
        let original = "start\n\u{1}ctrl é ü 𝄞 😀 \"q\" \\ end\n".repeat(20);
        let json = serde_json::json!({ "logs": original }).to_string();
        let ascii: String = json
            .chars()
            .flat_map(|c| {
                if c.is_ascii() {
                    vec![c.to_string()]
                } else {
                    let mut units = [0u16; 2];
                    c.encode_utf16(&mut units)
                        .iter()
                        .map(|u| format!("\\u{u:04x}"))
                        .collect()
                }
            })
            .collect();
        assert!(ascii.is_ascii());
        assert_eq!(assert_chunking_invariant(&ascii, 1 << 20), original);
        assert_eq!(assert_chunking_invariant(&json, 1 << 20), original);
    }

    #[test]
    fn keeps_only_the_tail_with_a_marker() {
        let lines: String = (0..1000).map(|i| format!("line {i:04}\n")).collect();
        let json = serde_json::json!({ "logs": lines }).to_string();
        let text = assert_chunking_invariant(&json, 100);
        let (marker, tail) = text.split_once('\n').unwrap();
        assert_eq!(
            marker,
            "[... log truncated: showing the last 100 bytes ...]"
        );
        assert_eq!(tail.len(), 100);
        assert!(lines.ends_with(tail));
        assert!(tail.ends_with("line 0999\n"));
        // Exactly at the limit: nothing cut, no marker.
        let exact = "x".repeat(100);
        assert_eq!(
            decode(&serde_json::json!({ "logs": exact }).to_string(), 100),
            exact
        );
    }

    #[test]
    fn tail_starts_on_a_char_boundary() {
        // "é" is 2 bytes, "😀" 4: cut at every offset.
        let text = "é😀a".repeat(50);
        let json = serde_json::json!({ "logs": text }).to_string();
        for max in 1..40 {
            let out = assert_chunking_invariant(&json, max);
            let (marker, tail) = out.split_once('\n').unwrap();
            assert!(
                tail.len() <= max && tail.len() + 3 >= max,
                "max {max}: {tail:?}"
            );
            assert!(text.ends_with(tail));
            assert_eq!(
                marker,
                format!(
                    "[... log truncated: showing the last {} bytes ...]",
                    tail.len()
                )
            );
        }
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        let cases = [
            (r#"{"logs": "a\ud83db"}"#, "a\u{FFFD}b"),
            (r#"{"logs": "a\ude00b"}"#, "a\u{FFFD}b"),
            (r#"{"logs": "a\ud83d\nb"}"#, "a\u{FFFD}\nb"),
            (r#"{"logs": "a\ud83d\u0041"}"#, "a\u{FFFD}A"),
            (r#"{"logs": "a\ud83d\ud83d\ude00"}"#, "a\u{FFFD}😀"),
            (r#"{"logs": "a\ud83d"}"#, "a\u{FFFD}"),
        ];
        for (json, expected) in cases {
            assert_eq!(assert_chunking_invariant(json, 1000), expected, "{json}");
        }
    }

    #[test]
    fn skips_other_keys_and_whitespace() {
        let json = " {\n \"a\": {\"logs\": \"no\", \"x\": [1, \"]\\\"\", {}]}, \"n\": -1.5e3, \"t\": true,\
                    \"s\": \"x\\\"y\", \"logs\" : \"yes\" , \"z\": null } \n";
        assert_eq!(assert_chunking_invariant(json, 100), "yes");
        assert_eq!(decode(r#"{"logs": ""}"#, 10), "");
        assert_eq!(decode(r#"{"logs": null}"#, 10), "");
    }

    #[test]
    fn rejects_malformed_or_incomplete_answers() {
        for json in [
            "",
            "[]",
            r#"{"logs": "abc"#,
            r#"{"logs": "abc""#,
            r#"{"other": "abc"}"#,
            r#"{"logs": "\q"}"#,
            r#"{"logs": "\u12g4"}"#,
            r#"{"logs": "a"} x"#,
            r#"{"logs" "a"}"#,
        ] {
            let mut decoder = LogsTailDecoder::new(10);
            let result = decoder
                .feed(json.as_bytes())
                .and_then(|()| decoder.finish());
            assert!(
                matches!(result, Err(RayError::Decode(_))),
                "{json}: {result:?}"
            );
        }
    }

    #[test]
    fn zero_max_bytes_keeps_only_the_marker() {
        assert_eq!(
            decode(r#"{"logs": "abc"}"#, 0),
            "[... log truncated: showing the last 0 bytes ...]\n"
        );
        assert_eq!(decode(r#"{"logs": ""}"#, 0), "");
    }

    #[test]
    fn transient_errors() {
        assert!(RayError::Unreachable("x".into()).is_transient());
        let http = |status, body: &str| RayError::Http {
            status,
            body: body.into(),
        };
        assert!(http(500, "boom").is_transient());
        assert!(http(503, "").is_transient());
        assert!(http(429, "").is_transient());
        assert!(!http(500, "Job with submission_id x already exists.").is_transient());
        assert!(!http(400, "bad").is_transient());
        assert!(!http(404, "").is_transient());
        assert!(!RayError::Decode("x".into()).is_transient());
    }

    #[test]
    fn submit_request_debug_hides_env_values() {
        let request = SubmitRequest {
            submission_id: "id".into(),
            entrypoint: "python main.py".into(),
            working_dir: "gcs://x.zip".into(),
            env_vars: BTreeMap::from([("ENV_JOB_GATEWAY_TOKEN".into(), "s3cr3t-token".into())]),
            pip: vec![],
        };
        let shown = format!("{request:?}");
        assert!(shown.contains("ENV_JOB_GATEWAY_TOKEN"));
        assert!(!shown.contains("s3cr3t"));
    }

    #[test]
    fn builds_urls_with_escaped_segments_and_prefixes() {
        crate::init_crypto();
        let client = RayClient::new("http://127.0.0.1:8265/", Duration::from_secs(1)).unwrap();
        assert_eq!(client.base_url(), "http://127.0.0.1:8265");
        assert_eq!(
            client.url(&["api", "jobs", ""]).as_str(),
            "http://127.0.0.1:8265/api/jobs/"
        );
        assert_eq!(
            client.url(&["api", "jobs", "a/b?c", "logs"]).as_str(),
            "http://127.0.0.1:8265/api/jobs/a%2Fb%3Fc/logs"
        );
        let prefixed = RayClient::new("https://proxy/ray/", Duration::from_secs(1)).unwrap();
        assert_eq!(
            prefixed.url(&["api", "version"]).as_str(),
            "https://proxy/ray/api/version"
        );
        assert!(RayClient::new("not a url", Duration::from_secs(1)).is_err());
        assert!(RayClient::new("ftp://host", Duration::from_secs(1)).is_err());
    }
}
