//! `/api/v1/jobs/...`: status, results, logs, stop, and the calls a running
//! function makes back (sub-status, error events, result).

use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Utc};
use poem::web::Data;
use poem_openapi::payload::{Form, Json};
use poem_openapi::{ApiRequest, ApiResponse, Object, OpenApi, param::Path, param::Query};
use serde_json::{Value, json};
use shared::domain::{JobStatus, SubStatus};
use shared::local_runner::LOCAL_HOST;
use shared::storage::{JobFilter, JobView, StopOutcome, SubStatusOutcome};
use uuid::Uuid;

use crate::auth::{Auth, Caller};
use crate::error::{ApiError, ApiResult};
use crate::routes::Tag;
use crate::state::{AppState, RAY_CALL_TIMEOUT};
use crate::views::{
    JobEventView, JobListItem, JobPage, Logs, Message, ResultView, job_detail, job_short,
};

pub struct JobsApi;

#[derive(ApiResponse)]
pub enum ResultResponse {
    /// The saved result.
    #[oai(status = 200)]
    Ok(Json<ResultView>),
    /// No result (yet).
    #[oai(status = 204)]
    NoContent,
}

#[derive(Object, Debug, serde::Deserialize)]
pub struct ResultForm {
    result: String,
}

#[derive(ApiRequest)]
pub enum ResultRequest {
    /// `{"result": <any JSON value>}`; an object is stored as its JSON text.
    Json(Json<Value>),
    Form(Form<ResultForm>),
}

#[derive(Object, Debug, serde::Deserialize)]
pub struct SubStatusBody {
    sub_status: Option<String>,
}

#[derive(ApiRequest)]
pub enum SubStatusRequest {
    Form(Form<SubStatusBody>),
    Json(Json<SubStatusBody>),
}

fn job_id(raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw).map_err(|_| ApiError::job_not_found(raw))
}

async fn load(state: &AppState, caller: &Caller, raw_id: &str) -> ApiResult<JobView> {
    let id = job_id(raw_id)?;
    state
        .store
        .job(caller.user.id, id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(id))
}

/// Client status names (`DONE`, `ERROR`...) are accepted beside the gateway's.
fn parse_status(raw: &str) -> ApiResult<JobStatus> {
    let mapped = match raw.trim().to_ascii_uppercase().as_str() {
        "DONE" => "SUCCEEDED".to_string(),
        "ERROR" => "FAILED".to_string(),
        "CANCELED" => "STOPPED".to_string(),
        "INITIALIZING" => "PENDING".to_string(),
        other => other
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    mapped
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("'status' has an unknown value '{raw}'.")))
}

fn parse_created_after(raw: &str) -> ApiResult<DateTime<Utc>> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(raw, fmt) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    Err(ApiError::BadRequest(format!(
        "'created_after' is not an ISO 8601 datetime: '{raw}'."
    )))
}

/// A result as text: objects are encoded, strings kept when they are JSON
/// already (the original's in-job clients send both), else encoded.
fn result_text(value: Value) -> String {
    match value {
        Value::String(s) if serde_json::from_str::<serde::de::IgnoredAny>(&s).is_ok() => s,
        other => other.to_string(),
    }
}

#[allow(clippy::too_many_arguments)]
#[OpenApi(prefix_path = "/jobs", tag = "Tag::Jobs")]
impl JobsApi {
    /// The caller's jobs, newest first.
    #[oai(path = "/", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        /// Page size (default 100; 0 = everything).
        limit: Query<Option<i64>>,
        offset: Query<Option<i64>>,
        /// Only jobs of this function (title).
        function: Query<Option<String>>,
        status: Query<Option<String>>,
        /// `serverless` (own functions) or `catalog` (provider functions).
        filter: Query<Option<String>>,
        created_after: Query<Option<String>>,
        raw: poem::web::Query<std::collections::BTreeMap<String, String>>,
    ) -> ApiResult<Json<JobPage>> {
        let caller = &auth.0;
        let limit = limit.0.unwrap_or(100);
        let offset = offset.0.unwrap_or(0);
        if limit < 0 || offset < 0 {
            return Err(ApiError::BadRequest(
                "'limit' and 'offset' must not be negative.".into(),
            ));
        }
        let mut job_filter = JobFilter {
            status: status
                .0
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(parse_status)
                .transpose()?,
            created_after: created_after
                .0
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(parse_created_after)
                .transpose()?,
            catalog: match filter.0.as_deref() {
                Some("catalog") => Some(true),
                Some("serverless") => Some(false),
                _ => None,
            },
            function: None,
        };
        // `provider=` (the client sends it for provider functions): none are
        // served, so no job matches, and a function under it does not exist.
        if let Some(provider) = raw
            .get("provider")
            .map(|p| shared::domain::sanitize_title(p))
            .filter(|p| !p.is_empty())
        {
            if let Some(title) = function
                .0
                .as_deref()
                .map(shared::domain::sanitize_title)
                .filter(|t| !t.is_empty())
            {
                return Err(ApiError::function_not_found(&format!("{provider}/{title}")));
            }
            return Ok(Json(JobPage {
                count: 0,
                next: None,
                previous: None,
                results: Vec::new(),
            }));
        }
        if let Some(title) = function.0.as_deref().filter(|s| !s.is_empty()) {
            let title = shared::domain::sanitize_title(title);
            if state
                .store
                .program_by_title(caller.user.id, &title)
                .await?
                .is_none()
            {
                return Err(ApiError::function_not_found(&title));
            }
            job_filter.function = Some(title);
        }
        let page_limit = (limit > 0).then_some(limit);
        let (count, rows) = state
            .store
            .list_jobs(caller.user.id, &job_filter, page_limit, offset)
            .await?;
        let link = |offset: i64| {
            format!(
                "{}/api/v1/jobs/?limit={limit}&offset={offset}",
                state.site_host
            )
        };
        let next = (limit > 0 && offset + limit < count).then(|| link(offset + limit));
        let previous = (limit > 0 && offset > 0).then(|| link((offset - limit).max(0)));
        Ok(Json(JobPage {
            count,
            next,
            previous,
            results: rows.iter().map(JobListItem::from).collect(),
        }))
    }

    /// One job. Without `with_result` the result is included (the 2023 client reads it here).
    #[oai(path = "/:id/", method = "get")]
    async fn retrieve(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        with_result: Query<Option<String>>,
    ) -> ApiResult<Json<Value>> {
        let view = load(&state, &auth.0, &id.0).await?;
        let with_result = match with_result
            .0
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("true") | Some("1") | Some("yes") | Some("on") | Some("") => true,
            Some("false") | Some("0") | Some("no") | Some("off") => false,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "'with_result' must be true or false, got '{other}'."
                )));
            }
        };
        Ok(Json(job_detail(&view, with_result)))
    }

    /// The result the function saved; 204 while there is none.
    #[oai(path = "/:id/result/", method = "get")]
    async fn result(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
    ) -> ApiResult<ResultResponse> {
        let view = load(&state, &auth.0, &id.0).await?;
        Ok(match view.job.result {
            Some(result) => ResultResponse::Ok(Json(ResultView { result })),
            None => ResultResponse::NoContent,
        })
    }

    /// Saves a result from inside the function (older SDKs): any JSON value, or a string.
    #[oai(path = "/:id/result/", method = "post")]
    async fn save_result(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        body: ResultRequest,
    ) -> ApiResult<Json<Value>> {
        let caller = &auth.0;
        let id = job_id(&id.0)?;
        let value = match body {
            ResultRequest::Json(Json(Value::Object(mut map))) if map.contains_key("result") => {
                map.remove("result").unwrap_or(Value::Null)
            }
            ResultRequest::Json(_) => {
                return Err(ApiError::BadRequest("'result' is required.".into()));
            }
            ResultRequest::Form(Form(form)) => Value::String(form.result),
        };
        let text = result_text(value);
        if text.len() > state.config.max_arguments_bytes * 16 {
            return Err(ApiError::PayloadTooLarge("The result is too large.".into()));
        }
        // A finished job's result is final (the function posts it before it exits).
        let current = load(&state, caller, &id.to_string()).await?;
        if current.job.status.is_terminal() {
            return Err(ApiError::Forbidden(format!(
                "Job [{id}] has ended ({}); its result can no longer change.",
                current.job.status
            )));
        }
        if !state
            .store
            .save_posted_result(caller.user.id, id, &text)
            .await?
        {
            return Err(ApiError::job_not_found(id));
        }
        let mut view = current;
        view.job.result = Some(text);
        Ok(Json(job_short(&view, true)))
    }

    /// The job's logs: stored once it ended, live from Ray while it runs.
    #[oai(path = "/:id/logs/", method = "get")]
    async fn logs(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
    ) -> ApiResult<Json<Logs>> {
        let view = load(&state, &auth.0, &id.0).await?;
        let job = view.job;
        if !job.finalized && job.ray_submitted {
            let host = job
                .ray_host
                .as_deref()
                .unwrap_or(state.config.ray.local_host.as_str());
            let cap = state.config.logs_size_limit;
            let live = async {
                if host == LOCAL_HOST {
                    return state.local_runner().logs_tail(job.id, cap).await.ok();
                }
                let ray = state.ray.get(host).ok()?;
                ray.logs_tail(&job.id.to_string(), cap).await.ok()
            };
            if let Ok(Some(logs)) = tokio::time::timeout(RAY_CALL_TIMEOUT, live).await {
                return Ok(Json(Logs { logs }));
            }
            return Ok(Json(Logs {
                logs: job
                    .logs
                    .unwrap_or_else(|| "Logs not available for this job during execution.".into()),
            }));
        }
        Ok(Json(Logs {
            logs: job.logs.unwrap_or_else(|| "No logs yet.".into()),
        }))
    }

    /// Stops the job in any active state. The body (the current client sends
    /// a `service` with credentials) is ignored and never logged.
    #[oai(path = "/:id/stop/", method = "post")]
    async fn stop(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
    ) -> ApiResult<Json<Message>> {
        let caller = &auth.0;
        let id = job_id(&id.0)?;
        let message = match state.store.stop_job(caller.user.id, id).await? {
            StopOutcome::NotFound => return Err(ApiError::job_not_found(id)),
            StopOutcome::AlreadyTerminal => "Job already in terminal state.",
            StopOutcome::Stopped { was, ray_host } => {
                tracing::info!(job_id = %id, user = %caller.user.username, from = %was, "job stopped by its user");
                // The tracker also stops it on Ray; doing it here too ends the
                // function sooner. A failure here is not the user's problem.
                if let Some(host) = ray_host.filter(|_| was != JobStatus::Queued) {
                    let stop = async {
                        if host == LOCAL_HOST {
                            return state.local_runner().stop(id).await.ok();
                        }
                        let ray = state.ray.get(&host).ok()?;
                        ray.stop(&id.to_string()).await.ok()
                    };
                    let _ = tokio::time::timeout(RAY_CALL_TIMEOUT, stop).await;
                }
                "Job has been stopped."
            }
        };
        Ok(Json(Message {
            message: message.into(),
        }))
    }

    /// Progress reported by the running function.
    #[oai(path = "/:id/sub_status/", method = "patch")]
    async fn sub_status(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        body: SubStatusRequest,
    ) -> ApiResult<Json<Value>> {
        let caller = &auth.0;
        let id = job_id(&id.0)?;
        let raw = match body {
            SubStatusRequest::Form(Form(b)) | SubStatusRequest::Json(Json(b)) => b.sub_status,
        };
        let sub = raw.as_deref().and_then(SubStatus::parse).ok_or_else(|| {
            ApiError::BadRequest("'sub_status' not provided or is not valid".into())
        })?;
        match state
            .store
            .set_sub_status(caller.user.id, id, sub.as_str())
            .await?
        {
            SubStatusOutcome::Updated(view) => Ok(Json(json!({ "job": job_short(&view, false) }))),
            SubStatusOutcome::NotActive(status) => Err(ApiError::Forbidden(format!(
                "Cannot update 'sub_status' when is not in active status. (Currently {status})"
            ))),
            SubStatusOutcome::NotFound => Err(ApiError::job_not_found(id)),
        }
    }

    /// An error event from the running function (`send_error`).
    #[oai(path = "/:id/event/", method = "post")]
    async fn event(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        body: Json<Value>,
    ) -> ApiResult<Json<Value>> {
        let caller = &auth.0;
        let id = job_id(&id.0)?;
        let Value::Object(body) = body.0 else {
            return Err(ApiError::BadRequest(
                "The event must be a JSON object.".into(),
            ));
        };
        let is_error = body
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.eq_ignore_ascii_case("ERROR"));
        if !is_error {
            return Err(ApiError::BadRequest("'type' must be ERROR.".into()));
        }
        let text = |k: &str| {
            body.get(k).map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
        };
        let data = json!({
            "code": text("code"),
            "message": text("message"),
            "exception": text("exception"),
            "args": body.get("args").cloned().unwrap_or(Value::Null),
        });
        match state
            .store
            .add_error_event(caller.user.id, id, data)
            .await?
        {
            None => Err(ApiError::job_not_found(id)),
            Some(false) => Err(ApiError::Forbidden(
                "You can create events on active jobs only".into(),
            )),
            Some(true) => Ok(Json(Value::Null)),
        }
    }

    /// The job's events, newest first.
    #[oai(path = "/:id/events/", method = "get")]
    async fn events(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        id: Path<String>,
        #[oai(name = "type")] event_type: Query<Option<String>>,
    ) -> ApiResult<Json<Vec<JobEventView>>> {
        let id = job_id(&id.0)?;
        let event_type = event_type
            .0
            .map(|t| t.to_ascii_uppercase())
            .filter(|t| !t.is_empty());
        let events = state
            .store
            .events(auth.0.user.id, id, event_type.as_deref())
            .await?
            .ok_or_else(|| ApiError::job_not_found(id))?;
        Ok(Json(events.iter().map(JobEventView::from).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_accept_client_names() {
        assert_eq!(parse_status("DONE").unwrap(), JobStatus::Succeeded);
        assert_eq!(
            parse_status("RUNNING: MAPPING").unwrap(),
            JobStatus::Running
        );
        assert_eq!(parse_status("queued").unwrap(), JobStatus::Queued);
        assert!(parse_status("BOGUS").is_err());
    }

    #[test]
    fn result_texts() {
        assert_eq!(result_text(json!({"a": 1})), "{\"a\":1}");
        assert_eq!(result_text(json!("{\"a\": 1}")), "{\"a\": 1}");
        assert_eq!(result_text(json!("plain")), "\"plain\"");
        assert_eq!(result_text(json!(3)), "3");
    }

    #[test]
    fn created_after_formats() {
        assert!(parse_created_after("2026-01-01T10:00:00Z").is_ok());
        assert!(parse_created_after("2026-01-01T10:00:00.123456").is_ok());
        assert!(parse_created_after("2026-01-01").is_ok());
        assert!(parse_created_after("yesterday").is_err());
    }
}
