//! `/api/v1/programs/...`: upload, list, look up and run functions.

use std::collections::BTreeMap;
use std::sync::Arc;

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::types::multipart::Upload;
use poem_openapi::{ApiRequest, Multipart, Object, OpenApi, param::Path, param::Query};
use serde_json::Value;
use shared::artifact;
use shared::domain::sanitize_title;
use shared::jobenv::JobSecrets;
use shared::storage::{CreateJob, NewJob, Program, ProgramUpsert};
use uuid::Uuid;

use crate::auth::{Auth, Caller};
use crate::error::{ApiError, ApiResult};
use crate::routes::Tag;
use crate::state::AppState;
use crate::views::{JobRunView, ProgramUploadView, ProgramView, timestamp};

pub struct ProgramsApi;

/// Upload form of the current client (all fields are form fields).
#[derive(Multipart, Debug)]
pub struct UploadForm {
    title: String,
    entrypoint: Option<String>,
    artifact: Option<Upload>,
    /// JSON list of `"name==version"` strings or `{"name": "version"}` objects.
    dependencies: Option<String>,
    /// JSON object of environment variables for the function; stored encrypted.
    env_vars: Option<String>,
    description: Option<String>,
    version: Option<String>,
    #[oai(rename = "type")]
    program_type: Option<String>,
    provider: Option<String>,
    image: Option<String>,
    arguments_schema: Option<String>,
}

/// The current client's run request.
#[derive(Object, Debug)]
pub struct RunJson {
    title: String,
    /// The arguments as a JSON-encoded string (an object is accepted too).
    arguments: Option<Value>,
    config: Option<Value>,
    provider: Option<String>,
}

/// The 2023 client's run request: upload and run in one call.
#[derive(Multipart, Debug)]
pub struct RunForm {
    title: String,
    entrypoint: Option<String>,
    artifact: Option<Upload>,
    arguments: Option<String>,
    dependencies: Option<String>,
}

#[derive(ApiRequest, Debug)]
pub enum RunRequest {
    Json(Json<RunJson>),
    Multipart(RunForm),
}

#[OpenApi(prefix_path = "/programs", tag = "Tag::Programs")]
impl ProgramsApi {
    /// The caller's functions.
    #[oai(path = "/", method = "get")]
    async fn list(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        query: poem::web::Query<BTreeMap<String, String>>,
    ) -> ApiResult<Json<Vec<ProgramView>>> {
        // The clients ask for the catalog (`filter=catalog`) or for one
        // provider's functions (`provider=`). Provider functions are not
        // served, so those lists are empty rather than the caller's own.
        let provider = query
            .get("provider")
            .map(|p| sanitize_title(p))
            .filter(|p| !p.is_empty());
        if provider.is_some() || query.get("filter").is_some_and(|f| f == "catalog") {
            return Ok(Json(Vec::new()));
        }
        let programs = state.store.programs(auth.0.user.id).await?;
        Ok(Json(programs.iter().map(ProgramView::from).collect()))
    }

    /// Creates or updates a function (by title) from a `.tar` of its working directory.
    #[oai(path = "/upload/", method = "post")]
    async fn upload(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        form: UploadForm,
    ) -> ApiResult<Json<ProgramUploadView>> {
        let title = function_title(&form.title, form.provider.as_deref())?;
        if form.image.is_some() {
            return Err(ApiError::BadRequest(
                "Custom images are only available to providers.".into(),
            ));
        }
        let env = match &form.env_vars {
            Some(raw) => parse_env_vars(raw)?,
            None => BTreeMap::new(),
        };
        let upsert = ProgramUpsert {
            title: title.clone(),
            entrypoint: form
                .entrypoint
                .as_deref()
                .map(validate_entrypoint)
                .transpose()?,
            artifact: None,
            dependencies: form
                .dependencies
                .as_deref()
                .map(parse_dependencies)
                .transpose()?
                .map(Value::from),
            env_vars_sealed: match &form.env_vars {
                Some(_) => Some(seal_env(&state, &env)?),
                None => None,
            },
            description: form.description.clone(),
            program_type: form
                .program_type
                .as_deref()
                .map(validate_type)
                .transpose()?,
            version: form.version.as_deref().map(validate_version).transpose()?,
            arguments_schema: form
                .arguments_schema
                .as_deref()
                .map(validate_schema)
                .transpose()?,
        };
        let program = save_program(&state, &auth.0, upsert, form.artifact).await?;
        Ok(Json(ProgramUploadView::new(
            &program,
            &env.into_keys().collect::<Vec<_>>(),
        )))
    }

    /// The caller's function of that title.
    #[oai(path = "/get_by_title/:title/", method = "get")]
    async fn get_by_title(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        title: Path<String>,
        provider: Query<Option<String>>,
    ) -> ApiResult<Json<ProgramView>> {
        let title = function_title(&title.0, provider.0.as_deref())?;
        let program = state
            .store
            .program_by_title(auth.0.user.id, &title)
            .await?
            .ok_or_else(|| ApiError::function_not_found(&title))?;
        Ok(Json(ProgramView::from(&program)))
    }

    /// Runs a function: JSON `{title, arguments, config}` for a stored function,
    /// or the 2023 multipart form that uploads and runs in one call.
    #[oai(path = "/run/", method = "post")]
    async fn run(
        &self,
        auth: Auth,
        state: Data<&Arc<AppState>>,
        body: RunRequest,
    ) -> ApiResult<Json<JobRunView>> {
        let caller = &auth.0;
        let (program, arguments, config, pip) = match body {
            RunRequest::Json(Json(req)) => {
                let title = function_title(&req.title, req.provider.as_deref())?;
                let program = state
                    .store
                    .program_by_title(caller.user.id, &title)
                    .await?
                    .ok_or_else(|| ApiError::function_not_found(&title))?;
                if let Some(config) = &req.config {
                    validate_config(config)?;
                }
                let arguments =
                    normalize_arguments(req.arguments, state.config.max_arguments_bytes)?;
                (program, arguments, req.config, Vec::new())
            }
            RunRequest::Multipart(form) => {
                let title = function_title(&form.title, None)?;
                let pip = match form.dependencies.as_deref() {
                    Some(raw) => parse_dependencies(raw)?,
                    None => Vec::new(),
                };
                let arguments = normalize_arguments(
                    form.arguments.map(Value::String),
                    state.config.max_arguments_bytes,
                )?;
                let upsert = ProgramUpsert {
                    title,
                    entrypoint: form
                        .entrypoint
                        .as_deref()
                        .map(validate_entrypoint)
                        .transpose()?,
                    dependencies: Some(Value::from(pip.clone())),
                    ..ProgramUpsert::default()
                };
                let program = save_program(&state, caller, upsert, form.artifact).await?;
                (program, arguments, None, pip)
            }
        };
        run_program(&state, caller, &program, arguments, config, pip)
            .await
            .map(Json)
    }
}

/// Validates and stores the artifact (if any), then upserts the function.
async fn save_program(
    state: &AppState,
    caller: &Caller,
    mut upsert: ProgramUpsert,
    artifact: Option<Upload>,
) -> ApiResult<Program> {
    let existing = state
        .store
        .program_by_title(caller.user.id, &upsert.title)
        .await?;
    match artifact {
        Some(upload) => {
            let name = upload.file_name().unwrap_or("artifact.tar").to_string();
            if !name.ends_with(".tar") {
                return Err(ApiError::BadRequest(
                    "The artifact must be a .tar file.".into(),
                ));
            }
            let bytes = upload.into_vec().await.map_err(|e| {
                ApiError::BadRequest(format!("The artifact could not be read: {e}"))
            })?;
            let limits = state.artifact_limits;
            let entrypoint = upsert
                .entrypoint
                .clone()
                .or_else(|| existing.as_ref().map(|p| p.entrypoint.clone()))
                .unwrap_or_else(|| "main.py".into());
            // Parsing a large tar is CPU work: keep it off the async threads.
            let (bytes, summary) = tokio::task::spawn_blocking(move || {
                let summary = artifact::validate_tar(&bytes, &limits);
                (bytes, summary)
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
            let summary = summary.map_err(artifact_error)?;
            if !summary.files.iter().any(|f| f == &entrypoint) {
                return Err(ApiError::BadRequest(format!(
                    "The entrypoint '{entrypoint}' is not in the artifact."
                )));
            }
            let sha = artifact::sha256_hex(&bytes);
            state.store.put_artifact(&sha, &bytes).await?;
            upsert.artifact = Some((sha, name));
        }
        None => match (&existing, &upsert.entrypoint) {
            (None, _) => {
                return Err(ApiError::BadRequest(
                    "An artifact (.tar of the function's directory) is required.".into(),
                ));
            }
            // A new entrypoint for the stored artifact must be in it.
            (Some(program), Some(entrypoint)) if entrypoint != &program.entrypoint => {
                let stored = match &program.artifact_sha256 {
                    Some(sha) => state.store.artifact(sha).await?,
                    None => None,
                };
                let limits = state.artifact_limits;
                let files = stored
                    .map(|tar| {
                        artifact::validate_tar(&tar, &limits)
                            .map(|s| s.files)
                            .unwrap_or_default()
                    })
                    .unwrap_or_default();
                if !files.iter().any(|f| f == entrypoint) {
                    return Err(ApiError::BadRequest(format!(
                        "The entrypoint '{entrypoint}' is not in the artifact."
                    )));
                }
            }
            (Some(_), _) => {}
        },
    }
    Ok(state.store.upsert_program(caller.user.id, &upsert).await?)
}

/// Commits the job as QUEUED, then wakes a worker. If Redis is down the job
/// stays committed and the reconciler dispatches it once Redis is back.
async fn run_program(
    state: &AppState,
    caller: &Caller,
    program: &Program,
    arguments: String,
    config: Option<Value>,
    pip: Vec<String>,
) -> ApiResult<JobRunView> {
    if program.artifact_sha256.is_none() {
        return Err(ApiError::BadRequest(format!(
            "Function {} has no artifact to run.",
            program.title
        )));
    }
    let secrets = JobSecrets {
        token: caller.token.clone(),
        channel: caller.channel.clone(),
        instance: caller.instance.clone(),
        gateway_host: state.site_host.clone(),
    };
    let env_sealed = secrets
        .seal(&state.secrets)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let new = NewJob {
        id: Uuid::new_v4(),
        author_id: caller.user.id,
        program_id: program.id,
        arguments,
        config,
        env_sealed,
        pip,
    };
    let job = match state
        .store
        .create_job(&new, state.config.limits.active_jobs_per_user)
        .await?
    {
        CreateJob::Created(job) => job,
        CreateJob::LimitReached => {
            return Err(ApiError::TooManyJobs(format!(
                "Active job limit reached: at most {} queued or running jobs per user.",
                state.config.limits.active_jobs_per_user
            )));
        }
    };
    tracing::info!(job_id = %job.id, user = %caller.user.username, function = %program.title, "job queued");
    match state.queue.push(&[job.id]).await {
        Ok(()) => {
            if let Err(e) = state.store.mark_enqueued(&[job.id]).await {
                tracing::warn!(job_id = %job.id, error = %e, "could not record the wake-up");
            }
        }
        Err(e) => {
            tracing::warn!(job_id = %job.id, error = %e, "queue push failed; the reconciler will dispatch the job")
        }
    }
    Ok(JobRunView {
        id: job.id.to_string(),
        result: None,
        status: job.status.to_string(),
        program: program.id.to_string(),
        created: timestamp(job.created),
        arguments: job.arguments,
        compute_profile: None,
    })
}

fn artifact_error(e: artifact::ArtifactError) -> ApiError {
    match e {
        artifact::ArtifactError::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
        other => ApiError::BadRequest(other.to_string()),
    }
}

/// The stored title; providers (`provider/title` or `provider=`) are not
/// served by this gateway yet, so they answer like an unknown function,
/// with the original's "Qiskit Function p/t doesn't exist.".
fn function_title(raw: &str, provider: Option<&str>) -> ApiResult<String> {
    let title = sanitize_title(raw.trim());
    if title.is_empty() || title.len() > 255 {
        return Err(ApiError::BadRequest(
            "'title' must be 1 to 255 characters of [A-Za-z0-9_-].".into(),
        ));
    }
    if title.matches('/').count() > 1 {
        return Err(ApiError::BadRequest(
            "'title' may contain at most one '/'.".into(),
        ));
    }
    if title.contains('/') {
        return Err(ApiError::function_not_found(&title));
    }
    if let Some(p) = provider.map(sanitize_title).filter(|p| !p.is_empty()) {
        return Err(ApiError::function_not_found(&format!("{p}/{title}")));
    }
    Ok(title)
}

fn validate_entrypoint(raw: &str) -> ApiResult<String> {
    let e = raw.trim().trim_start_matches("./");
    let ok = e.ends_with(".py")
        && e.len() > 3
        && !e.starts_with('/')
        && !e.split('/').any(|seg| seg == ".." || seg.is_empty())
        && e.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-'));
    if ok {
        Ok(e.to_string())
    } else {
        Err(ApiError::BadRequest(format!(
            "'entrypoint' must be a relative path to a .py file inside the artifact, got '{raw}'."
        )))
    }
}

fn parse_dependencies(raw: &str) -> ApiResult<Vec<String>> {
    let bad = || {
        ApiError::BadRequest("'dependencies' must be a JSON list of \"name==version\" strings or {\"name\": \"version\"} objects.".into())
    };
    if raw.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_str(raw).map_err(|_| bad())?;
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let mut out = Vec::new();
    for item in items {
        let dep = match item {
            Value::String(s) => s,
            Value::Object(map) if map.len() == 1 => {
                let (name, version) = map.into_iter().next().ok_or_else(bad)?;
                match version {
                    Value::String(v) if v.is_empty() => name,
                    Value::String(v) => format!("{name}=={v}"),
                    _ => return Err(bad()),
                }
            }
            _ => return Err(bad()),
        };
        let pins = dep.matches("==").count();
        let name = dep.split("==").next().unwrap_or_default();
        if pins > 1
            || name.is_empty()
            || !dep.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'_' | b'-' | b'.' | b'=' | b'[' | b']' | b',')
            })
        {
            return Err(ApiError::BadRequest(format!(
                "Invalid dependency '{dep}': expected 'name' or 'name==version'."
            )));
        }
        out.push(dep);
    }
    Ok(out)
}

fn parse_env_vars(raw: &str) -> ApiResult<BTreeMap<String, String>> {
    let bad = || ApiError::BadRequest("'env_vars' must be a JSON object of string values.".into());
    if raw.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let value: Value = serde_json::from_str(raw).map_err(|_| bad())?;
    let Value::Object(map) = value else {
        return Err(bad());
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) if !k.is_empty() && !k.contains('=') => Ok((k, s)),
            _ => Err(bad()),
        })
        .collect()
}

fn seal_env(state: &AppState, env: &BTreeMap<String, String>) -> ApiResult<Vec<u8>> {
    let plain = serde_json::to_vec(env).map_err(|e| ApiError::Internal(e.to_string()))?;
    state
        .secrets
        .seal(&plain)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn validate_type(raw: &str) -> ApiResult<String> {
    match raw {
        "GENERIC" | "APPLICATION" | "CIRCUIT" => Ok(raw.to_string()),
        _ => Err(ApiError::BadRequest(
            "'type' must be GENERIC, APPLICATION or CIRCUIT.".into(),
        )),
    }
}

fn validate_version(raw: &str) -> ApiResult<String> {
    let v = raw.trim();
    let mut parts = v.split(['.', '-', '+']);
    let first_numeric = parts
        .next()
        .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if first_numeric
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
    {
        Ok(v.to_string())
    } else {
        Err(ApiError::BadRequest(
            "Invalid version - expected format x.y.z".into(),
        ))
    }
}

fn validate_schema(raw: &str) -> ApiResult<String> {
    if raw.len() > 64 * 1024 {
        return Err(ApiError::BadRequest(
            "'arguments_schema' is larger than 64 KiB.".into(),
        ));
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(_)) => Ok(raw.to_string()),
        _ => Err(ApiError::BadRequest(
            "'arguments_schema' must be a JSON object.".into(),
        )),
    }
}

/// `config` of a run: worker counts within the original's bounds.
fn validate_config(config: &Value) -> ApiResult<()> {
    let Value::Object(map) = config else {
        return Err(ApiError::BadRequest("'config' must be an object.".into()));
    };
    for (key, max) in [("workers", 5), ("min_workers", 2), ("max_workers", 10)] {
        match map.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= max) => {}
            Some(_) => {
                return Err(ApiError::BadRequest(format!(
                    "'config.{key}' must be a whole number from 0 to {max}."
                )));
            }
        }
    }
    match map.get("auto_scaling") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(()),
        Some(_) => Err(ApiError::BadRequest(
            "'config.auto_scaling' must be true or false.".into(),
        )),
    }
}

/// The arguments as the JSON text the function will read: a string must
/// hold JSON; an object is encoded.
fn normalize_arguments(raw: Option<Value>, max_bytes: usize) -> ApiResult<String> {
    let text = match raw {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) if s.trim().is_empty() => "{}".to_string(),
        Some(Value::String(s)) => {
            if s.len() <= max_bytes && serde_json::from_str::<serde::de::IgnoredAny>(&s).is_err() {
                return Err(ApiError::BadRequest(
                    "'arguments' must be a JSON-encoded string.".into(),
                ));
            }
            s
        }
        Some(other) => other.to_string(),
    };
    if text.len() > max_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "'arguments' is larger than {max_bytes} bytes."
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entrypoints() {
        assert_eq!(validate_entrypoint("main.py").unwrap(), "main.py");
        assert_eq!(validate_entrypoint("./src/run.py").unwrap(), "src/run.py");
        for bad in ["../x.py", "/abs.py", "main.sh", "a//b.py", ".py", "a b.py"] {
            assert!(validate_entrypoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dependencies_forms() {
        assert_eq!(
            parse_dependencies("[\"a==1.0\", {\"b\": \"2\"}, \"c\"]").unwrap(),
            vec!["a==1.0", "b==2", "c"]
        );
        assert!(parse_dependencies("{}").is_err());
        assert!(parse_dependencies("[\"a==1==2\"]").is_err());
        assert!(parse_dependencies("[\"a; rm -rf\"]").is_err());
        assert!(parse_dependencies("").unwrap().is_empty());
    }

    #[test]
    fn arguments() {
        assert_eq!(
            normalize_arguments(Some(Value::String("{\"a\":1}".into())), 100).unwrap(),
            "{\"a\":1}"
        );
        assert_eq!(
            normalize_arguments(Some(serde_json::json!({"a": 1})), 100).unwrap(),
            "{\"a\":1}"
        );
        assert_eq!(normalize_arguments(None, 100).unwrap(), "{}");
        assert!(matches!(
            normalize_arguments(Some(Value::String("{nope".into())), 100),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            normalize_arguments(Some(Value::String("\"xxxxxxxx\"".into())), 4),
            Err(ApiError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn config_bounds() {
        assert!(validate_config(&serde_json::json!({"workers": null, "min_workers": null, "max_workers": null, "auto_scaling": false})).is_ok());
        assert!(validate_config(&serde_json::json!({"workers": 6})).is_err());
        assert!(validate_config(&serde_json::json!({"auto_scaling": "yes"})).is_err());
        assert!(validate_config(&serde_json::json!([])).is_err());
    }

    #[test]
    fn titles_and_versions() {
        assert_eq!(function_title("my fn", None).unwrap(), "myfn");
        assert!(matches!(
            function_title("p/t", None),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            function_title("a/b/c", None),
            Err(ApiError::BadRequest(_))
        ));
        assert!(function_title("!!!", None).is_err());
        assert!(validate_version("1.2.3").is_ok());
        assert!(validate_version("abc").is_err());
    }
}
