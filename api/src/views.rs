//! Response shapes of the contract (API_CONTRACT.md §1.2). JSON-holding
//! text fields are returned as strings, datetimes end in `Z`, and `provider`
//! is left out for functions without one, as the original does.

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use serde_json::{Value, json};
use shared::storage::{JobEvent, JobListRow, JobView, Program};

pub fn timestamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A function, as the programs list and `get_by_title` show it.
#[derive(Object, Debug)]
pub struct ProgramView {
    pub id: String,
    pub title: String,
    pub entrypoint: String,
    pub artifact: Option<String>,
    /// JSON-encoded list.
    pub dependencies: String,
    #[oai(skip_serializing_if_is_none)]
    pub provider: Option<String>,
    pub description: String,
    pub documentation_url: Option<String>,
    #[oai(rename = "type")]
    pub program_type: String,
    pub version: Option<String>,
    pub runner: String,
    pub arguments_schema: String,
}

impl From<&Program> for ProgramView {
    fn from(p: &Program) -> Self {
        ProgramView {
            id: p.id.to_string(),
            title: p.title.clone(),
            entrypoint: p.entrypoint.clone(),
            artifact: p.artifact_name.clone(),
            dependencies: p.dependencies.to_string(),
            provider: p.provider.clone(),
            description: p.description.clone(),
            documentation_url: p.documentation_url.clone(),
            program_type: p.program_type.clone(),
            version: p.version.clone(),
            runner: p.runner.clone(),
            arguments_schema: p.arguments_schema.clone(),
        }
    }
}

/// The upload answer: no id, `provider` always present.
#[derive(Object, Debug)]
pub struct ProgramUploadView {
    pub title: String,
    pub entrypoint: String,
    pub artifact: Option<String>,
    pub dependencies: String,
    /// Names only: values are secrets and are never returned.
    pub env_vars: String,
    pub image: Option<String>,
    pub provider: Option<String>,
    pub description: String,
    #[oai(rename = "type")]
    pub program_type: String,
    pub version: Option<String>,
    pub runner: String,
    pub arguments_schema: String,
}

impl ProgramUploadView {
    pub fn new(p: &Program, env_var_names: &[String]) -> Self {
        let masked: serde_json::Map<String, Value> = env_var_names
            .iter()
            .map(|k| (k.clone(), Value::String("***".into())))
            .collect();
        ProgramUploadView {
            title: p.title.clone(),
            entrypoint: p.entrypoint.clone(),
            artifact: p.artifact_name.clone(),
            dependencies: p.dependencies.to_string(),
            env_vars: Value::Object(masked).to_string(),
            image: None,
            provider: p.provider.clone(),
            description: p.description.clone(),
            program_type: p.program_type.clone(),
            version: p.version.clone(),
            runner: p.runner.clone(),
            arguments_schema: p.arguments_schema.clone(),
        }
    }
}

/// The run answer.
#[derive(Object, Debug)]
pub struct JobRunView {
    pub id: String,
    pub result: Option<String>,
    pub status: String,
    /// The function's id.
    pub program: String,
    pub created: String,
    pub arguments: String,
    pub compute_profile: Option<String>,
}

#[derive(Object, Debug)]
pub struct ListProgramRef {
    pub id: String,
    pub title: String,
    pub provider: Option<String>,
}

#[derive(Object, Debug)]
pub struct JobListItem {
    pub id: String,
    pub status: String,
    pub program: ListProgramRef,
    pub created: String,
    pub sub_status: Option<String>,
    pub compute_profile: Option<String>,
}

impl From<&JobListRow> for JobListItem {
    fn from(r: &JobListRow) -> Self {
        JobListItem {
            id: r.id.to_string(),
            status: r.status.to_string(),
            program: ListProgramRef {
                id: r.program_id.to_string(),
                title: r.program_title.clone(),
                provider: r.program_provider.clone(),
            },
            created: timestamp(r.created),
            sub_status: r.sub_status.clone(),
            compute_profile: None,
        }
    }
}

#[derive(Object, Debug)]
pub struct JobPage {
    pub count: i64,
    pub next: Option<String>,
    pub previous: Option<String>,
    pub results: Vec<JobListItem>,
}

#[derive(Object, Debug)]
pub struct Message {
    pub message: String,
}

#[derive(Object, Debug)]
pub struct Logs {
    pub logs: String,
}

#[derive(Object, Debug)]
pub struct ResultView {
    /// The function's result as the raw JSON text it saved.
    pub result: String,
}

#[derive(Object, Debug)]
pub struct JobEventView {
    pub event_type: String,
    pub origin: String,
    pub context: String,
    pub created: String,
    pub data: Value,
}

impl From<&JobEvent> for JobEventView {
    fn from(e: &JobEvent) -> Self {
        JobEventView {
            event_type: e.event_type.clone(),
            origin: e.origin.clone(),
            context: e.context.clone(),
            created: timestamp(e.created),
            data: e.data.clone(),
        }
    }
}

fn with_provider(mut obj: serde_json::Map<String, Value>, provider: &Option<String>) -> Value {
    if let Some(p) = provider {
        obj.insert("provider".into(), Value::String(p.clone()));
    }
    Value::Object(obj)
}

/// `{id, title, provider?}`
pub fn program_ref(p: &Program) -> Value {
    let Value::Object(obj) = json!({ "id": p.id.to_string(), "title": p.title }) else {
        unreachable!()
    };
    with_provider(obj, &p.provider)
}

/// The program as `with_result=true` and the result routes show it.
pub fn program_full(p: &Program) -> Value {
    let Value::Object(obj) = json!({
        "id": p.id.to_string(),
        "title": p.title,
        "entrypoint": p.entrypoint,
        "artifact": p.artifact_name,
        "dependencies": p.dependencies.to_string(),
        "description": p.description,
        "documentation_url": p.documentation_url,
        "type": p.program_type,
    }) else {
        unreachable!()
    };
    with_provider(obj, &p.provider)
}

/// `GET jobs/{id}/`: the short shape, or with `result` and the full program.
pub fn job_detail(v: &JobView, with_result: bool) -> Value {
    let j = &v.job;
    let mut obj = json!({
        "id": j.id.to_string(),
        "status": j.status.as_str(),
        "created": timestamp(j.created),
        "sub_status": j.sub_status,
        "fleet_id": Value::Null,
        "compute_profile": Value::Null,
        "business_model": "SUBSIDIZED",
    });
    if with_result {
        obj["result"] = json!(j.result);
        obj["program"] = program_full(&v.program);
    } else {
        obj["program"] = program_ref(&v.program);
    }
    obj
}

/// The short job shape `sub_status` and `result` answer with.
pub fn job_short(v: &JobView, with_result: bool) -> Value {
    let j = &v.job;
    let mut obj = json!({
        "id": j.id.to_string(),
        "status": j.status.as_str(),
        "program": if with_result { program_full(&v.program) } else { program_ref(&v.program) },
        "created": timestamp(j.created),
        "sub_status": j.sub_status,
    });
    if with_result {
        obj["result"] = json!(j.result);
    }
    obj
}
