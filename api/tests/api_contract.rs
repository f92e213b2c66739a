//! The HTTP contract (API_CONTRACT.md §0–§1, DESIGN.md §5–§6) route by
//! route: status codes and JSON bodies, against a real API, Postgres and
//! Redis. No job runs here (no workers), so nothing needs Ray.

mod support;

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use support::{Options, TOKEN, TOKEN_BOB, TestGateway, tar_of};

const MAIN: &str = "print('hello')\n";

async fn gateway() -> TestGateway {
    TestGateway::start(Options::default().workers(0)).await
}

/// Sends a request and returns status, headers and the body as JSON
/// (a non-JSON body becomes a JSON string, an empty one `null`).
async fn send(req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, headers, body)
}

/// `application/x-www-form-urlencoded` bodies, as the clients send for
/// `sub_status` and older in-job result saves.
trait Urlencoded {
    fn urlencoded(self, pairs: &[(&str, &str)]) -> Self;
}

impl Urlencoded for reqwest::RequestBuilder {
    fn urlencoded(self, pairs: &[(&str, &str)]) -> Self {
        let mut url = reqwest::Url::parse("http://x/").expect("url");
        url.query_pairs_mut().extend_pairs(pairs);
        let body = url.query().unwrap_or_default().to_string();
        self.header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
    }
}

async fn count(gw: &TestGateway, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&gw.pool)
        .await
        .expect("count")
}

/// An error body of the contract: a JSON object with a non-empty `message`.
#[track_caller]
fn assert_message(body: &Value) -> &str {
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("JSON error body with `message`, got {body}"));
    assert!(!message.is_empty(), "empty message: {body}");
    message
}

/// A tar whose member names are written as given, unchecked (the `tar`
/// crate refuses `..` and absolute names, which is what the gateway must
/// refuse too).
fn raw_tar(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut header = tar::Header::new_gnu();
        let gnu = header.as_gnu_mut().expect("gnu header");
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder
            .append(&header, content.as_bytes())
            .expect("tar entry");
    }
    builder.into_inner().expect("tar")
}

fn upload_form(title: &str, entrypoint: &str, tar: Vec<u8>, file_name: &str) -> Form {
    Form::new()
        .text("title", title.to_string())
        .text("entrypoint", entrypoint.to_string())
        .text("dependencies", "[]")
        .text("env_vars", "{}")
        .part(
            "artifact",
            Part::bytes(tar).file_name(file_name.to_string()),
        )
}

fn run_body(title: &str, arguments: &str) -> Value {
    json!({
        "title": title,
        "arguments": arguments,
        "config": {"workers": null, "min_workers": null, "max_workers": null, "auto_scaling": false},
    })
}

async fn upload_main(gw: &TestGateway, token: &str, title: &str) {
    let (status, body) = gw.upload(token, title, &[("main.py", MAIN)]).await;
    assert_eq!(status, 200, "upload {title}: {body}");
}

/// A function `f` of alice's and one queued job of it.
async fn queued_job(gw: &TestGateway) -> String {
    upload_main(gw, TOKEN, "f").await;
    gw.run(TOKEN, "f", &json!({"n": 1})).await
}

fn is_uuid(v: &Value) -> bool {
    v.as_str().is_some_and(|s| uuid::Uuid::parse_str(s).is_ok())
}

fn is_timestamp(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(s).is_ok())
}

// ---- authentication -------------------------------------------------------

#[tokio::test]
async fn auth_missing_header_is_401_detail() {
    let gw = gateway().await;
    let (status, headers, body) = send(reqwest::Client::new().get(gw.api("programs/"))).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "DRF shape {{\"detail\": ...}}: {body}"
    );
    assert!(body.get("message").is_none(), "{body}");
    let www = headers
        .get("www-authenticate")
        .expect("WWW-Authenticate header")
        .to_str()
        .unwrap();
    assert!(www.starts_with("Bearer"), "{www}");
    gw.shutdown().await;
}

#[tokio::test]
async fn auth_wrong_token_is_401() {
    let gw = gateway().await;
    let (status, headers, body) = send(
        reqwest::Client::new()
            .get(gw.api("programs/"))
            .bearer_auth("nope"),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert!(headers.contains_key("www-authenticate"));
    // Nothing is created for an unknown caller.
    assert_eq!(count(&gw, "users").await, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn auth_any_scheme_word_and_client_headers() {
    let gw = gateway().await;
    let http = reqwest::Client::new();
    let (status, _, body) = send(
        http.get(gw.api("programs/"))
            .header("Authorization", format!("Token {TOKEN}")),
    )
    .await;
    assert_eq!((status, &body), (200, &json!([])));
    // What the current client sends with channel="local" and an instance.
    let (status, _, body) = send(
        http.get(gw.api("programs/"))
            .bearer_auth(TOKEN)
            .header("Service-Channel", "local")
            .header(
                "Service-CRN",
                "crn:v1:bluemix:public:quantum-computing:us-east:a/x::",
            ),
    )
    .await;
    assert_eq!((status, &body), (200, &json!([])));
    let (status, _, body) = send(
        http.get(gw.api("programs/"))
            .bearer_auth(TOKEN)
            .header("Service-Channel", "ibm_quantum_platform"),
    )
    .await;
    assert_eq!((status, &body), (200, &json!([])));
    gw.shutdown().await;
}

// ---- probes, docs, slashes ------------------------------------------------

#[tokio::test]
async fn programs_list_with_and_without_slash() {
    let gw = gateway().await;
    for path in ["programs", "programs/"] {
        let (status, body) = gw.get(TOKEN, path).await;
        assert_eq!((status, &body), (200, &json!([])), "{path}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn probes_version_openapi_and_docs() {
    let gw = gateway().await;
    let http = reqwest::Client::new();
    let (status, _, body) = send(http.get(format!("{}/liveness/", gw.url))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "alive");
    let (status, _, body) = send(http.get(format!("{}/readiness/", gw.url))).await;
    assert_eq!((status, &body), (200, &json!({"status": "ready"})));
    let (status, _, body) = send(http.get(format!("{}/version/", gw.url))).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{body}"
    );

    let (status, _, body) = send(http.get(format!("{}/openapi.json", gw.url))).await;
    assert_eq!(status, 200);
    let paths = body["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("an OpenAPI document with paths: {body}"));
    assert!(
        paths.keys().any(|p| p.contains("programs")),
        "{:?}",
        paths.keys()
    );
    assert!(
        paths.keys().any(|p| p.contains("jobs")),
        "{:?}",
        paths.keys()
    );

    let resp = http.get(format!("{}/docs/", gw.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let html = resp.text().await.unwrap();
    assert!(html.to_ascii_lowercase().contains("<html"), "{html}");
    gw.shutdown().await;
}

// ---- upload -----------------------------------------------------------------

#[tokio::test]
async fn upload_valid_tar() {
    let gw = gateway().await;
    let form = upload_form(
        "hello",
        "main.py",
        tar_of(&[("main.py", MAIN)]),
        "artifact.tar",
    )
    .text("description", "first");
    let (status, body) = gw.post_form(TOKEN, "programs/upload/", form).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["title"], "hello");
    assert_eq!(body["entrypoint"], "main.py");
    assert_eq!(body["description"], "first");
    assert_eq!(body["dependencies"], "[]", "a JSON-encoded string");
    assert!(body["env_vars"].is_string(), "{body}");
    assert!(
        body.get("provider").is_some_and(Value::is_null),
        "upload shows provider: null: {body}"
    );
    assert!(
        body.get("id").is_none(),
        "the upload answer has no id: {body}"
    );
    assert_eq!(count(&gw, "programs").await, 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn upload_upserts_by_title() {
    let gw = gateway().await;
    let tar = || tar_of(&[("main.py", MAIN), ("other.py", MAIN)]);
    let (status, body) = gw
        .post_form(
            TOKEN,
            "programs/upload/",
            upload_form("f", "main.py", tar(), "a.tar").text("description", "one"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = gw
        .post_form(
            TOKEN,
            "programs/upload/",
            upload_form("f", "other.py", tar(), "a.tar").text("description", "two"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entrypoint"], "other.py");
    assert_eq!(body["description"], "two");

    let (status, list) = gw.get(TOKEN, "programs/").await;
    assert_eq!(status, 200);
    let list = list.as_array().expect("bare array");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["title"], "f");
    assert_eq!(list[0]["entrypoint"], "other.py");
    assert_eq!(list[0]["description"], "two");
    assert_eq!(count(&gw, "programs").await, 1);
    gw.shutdown().await;
}

/// Every rejected upload answers JSON `message` with the status given and
/// stores nothing.
async fn rejected_upload(gw: &TestGateway, form: Form, expected: u16) -> String {
    let programs = count(gw, "programs").await;
    let artifacts = count(gw, "artifacts").await;
    let (status, body) = gw.post_form(TOKEN, "programs/upload/", form).await;
    assert_eq!(status, expected, "{body}");
    let message = assert_message(&body).to_string();
    assert_eq!(
        count(gw, "programs").await,
        programs,
        "no program stored after: {message}"
    );
    assert_eq!(
        count(gw, "artifacts").await,
        artifacts,
        "no artifact stored after: {message}"
    );
    message
}

#[tokio::test]
async fn upload_without_artifact_on_create_is_400() {
    let gw = gateway().await;
    let form = Form::new()
        .text("title", "f")
        .text("entrypoint", "main.py")
        .text("dependencies", "[]");
    rejected_upload(&gw, form, 400).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn upload_non_tar_name_is_400() {
    let gw = gateway().await;
    rejected_upload(
        &gw,
        upload_form("f", "main.py", tar_of(&[("main.py", MAIN)]), "artifact.zip"),
        400,
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn upload_parent_dir_member_is_400() {
    let gw = gateway().await;
    let tar = raw_tar(&[("main.py", MAIN), ("../evil.py", "print('evil')\n")]);
    rejected_upload(&gw, upload_form("f", "main.py", tar, "artifact.tar"), 400).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn upload_absolute_member_is_400() {
    let gw = gateway().await;
    let tar = raw_tar(&[("main.py", MAIN), ("/tmp/evil.py", "print('evil')\n")]);
    rejected_upload(&gw, upload_form("f", "main.py", tar, "artifact.tar"), 400).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn upload_entrypoint_missing_from_tar_is_400() {
    let gw = gateway().await;
    let message = rejected_upload(
        &gw,
        upload_form("f", "run.py", tar_of(&[("main.py", MAIN)]), "artifact.tar"),
        400,
    )
    .await;
    assert!(message.contains("run.py"), "{message}");
    gw.shutdown().await;
}

#[tokio::test]
async fn upload_bad_dependencies_is_400() {
    let gw = gateway().await;
    for deps in ["[not json", "{\"a\": 1}", "[\"a; rm -rf /\"]"] {
        let form = Form::new()
            .text("title", "f")
            .text("entrypoint", "main.py")
            .text("dependencies", deps)
            .part(
                "artifact",
                Part::bytes(tar_of(&[("main.py", MAIN)])).file_name("artifact.tar"),
            );
        rejected_upload(&gw, form, 400).await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn upload_too_large_is_413() {
    let gw = TestGateway::start(
        Options::default()
            .workers(0)
            .var("GATEWAY_MAX_ARTIFACT_BYTES", "4096"),
    )
    .await;
    let big = "#".repeat(10 * 1024);
    let tar = tar_of(&[("main.py", MAIN), ("data.py", big.as_str())]);
    assert!(tar.len() > 10 * 1024);
    rejected_upload(&gw, upload_form("f", "main.py", tar, "artifact.tar"), 413).await;
    // A small one still fits.
    let (status, body) = gw.upload(TOKEN, "f", &[("main.py", MAIN)]).await;
    assert_eq!(status, 200, "{body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn upload_ignores_unknown_fields() {
    let gw = gateway().await;
    let form = upload_form("f", "main.py", tar_of(&[("main.py", MAIN)]), "artifact.tar")
        .text("arguments", "{}")
        .text("something_new", "whatever");
    let (status, body) = gw.post_form(TOKEN, "programs/upload/", form).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["title"], "f");
    assert_eq!(count(&gw, "programs").await, 1);
    gw.shutdown().await;
}

// ---- get_by_title -----------------------------------------------------------

#[tokio::test]
async fn get_by_title_own_function_shape() {
    let gw = gateway().await;
    let form = Form::new()
        .text("title", "f")
        .text("entrypoint", "main.py")
        .text("dependencies", "[\"pendulum==3.0.0\"]")
        .text("description", "desc")
        .part(
            "artifact",
            Part::bytes(tar_of(&[("main.py", MAIN)])).file_name("artifact.tar"),
        );
    let (status, body) = gw.post_form(TOKEN, "programs/upload/", form).await;
    assert_eq!(status, 200, "{body}");
    for path in ["programs/get_by_title/f/", "programs/get_by_title/f"] {
        let (status, body) = gw.get(TOKEN, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(is_uuid(&body["id"]), "{body}");
        assert_eq!(body["title"], "f");
        assert_eq!(body["entrypoint"], "main.py");
        assert_eq!(body["description"], "desc");
        let deps = body["dependencies"]
            .as_str()
            .expect("dependencies is a string");
        assert_eq!(
            serde_json::from_str::<Value>(deps).unwrap(),
            json!(["pendulum==3.0.0"])
        );
        assert!(
            body.get("provider").is_none(),
            "no provider key for own functions: {body}"
        );
        assert_eq!(body["type"], "GENERIC");
        assert_eq!(body["runner"], "ray");
        assert!(body["arguments_schema"].is_string(), "{body}");
    }
    // The list shows the same object.
    let (_, list) = gw.get(TOKEN, "programs/").await;
    let (_, one) = gw.get(TOKEN, "programs/get_by_title/f/").await;
    assert_eq!(list, json!([one]));
    gw.shutdown().await;
}

#[tokio::test]
async fn get_by_title_unknown_is_404() {
    let gw = gateway().await;
    let (status, body) = gw.get(TOKEN, "programs/get_by_title/x/").await;
    assert_eq!(
        (status, &body),
        (404, &json!({"message": "Qiskit Function x doesn't exist."}))
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn get_by_title_of_another_user_is_404() {
    let gw = gateway().await;
    upload_main(&gw, TOKEN, "mine").await;
    let (status, body) = gw.get(TOKEN_BOB, "programs/get_by_title/mine/").await;
    assert_eq!(
        (status, &body),
        (
            404,
            &json!({"message": "Qiskit Function mine doesn't exist."})
        )
    );
    let (status, body) = gw.get(TOKEN_BOB, "programs/").await;
    assert_eq!((status, &body), (200, &json!([])));
    gw.shutdown().await;
}

// ---- run --------------------------------------------------------------------

#[tokio::test]
async fn run_valid_is_queued() {
    let gw = gateway().await;
    upload_main(&gw, TOKEN, "f").await;
    let (_, program) = gw.get(TOKEN, "programs/get_by_title/f/").await;
    let (status, body) = gw
        .post_json(TOKEN, "programs/run/", &run_body("f", "{\"n\": 1}"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(is_uuid(&body["id"]), "{body}");
    assert_eq!(body["status"], "QUEUED");
    assert_eq!(
        body["program"], program["id"],
        "program is the function's UUID string"
    );
    assert!(body["result"].is_null(), "{body}");
    assert!(is_timestamp(&body["created"]), "{body}");
    assert!(
        body.get("compute_profile").is_some_and(Value::is_null),
        "{body}"
    );
    assert_eq!(count(&gw, "jobs").await, 1);
    // Without config (the 2023 JSON shape) too.
    let (status, body) = gw
        .post_json(
            TOKEN,
            "programs/run/",
            &json!({"title": "f", "arguments": "{}"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&gw, "jobs").await, 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn run_unknown_function_is_404() {
    let gw = gateway().await;
    let (status, body) = gw
        .post_json(TOKEN, "programs/run/", &run_body("nope", "{}"))
        .await;
    assert_eq!(
        (status, &body),
        (
            404,
            &json!({"message": "Qiskit Function nope doesn't exist."})
        )
    );
    // Another user's function is unknown as well.
    upload_main(&gw, TOKEN, "f").await;
    let (status, body) = gw
        .post_json(TOKEN_BOB, "programs/run/", &run_body("f", "{}"))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_message(&body);
    assert_eq!(count(&gw, "jobs").await, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn run_rejects_bad_requests_without_inserting() {
    let gw = TestGateway::start(
        Options::default()
            .workers(0)
            .var("GATEWAY_MAX_ARGUMENTS_BYTES", "1024"),
    )
    .await;
    upload_main(&gw, TOKEN, "f").await;
    let http = reqwest::Client::new();

    // Malformed JSON.
    let (status, _, body) = send(
        http.post(gw.api("programs/run/"))
            .bearer_auth(TOKEN)
            .header("Content-Type", "application/json")
            .body("{\"title\": \"f\", \"arguments\": "),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_message(&body);

    // Arguments that are not JSON.
    let (status, body) = gw
        .post_json(TOKEN, "programs/run/", &run_body("f", "{not json"))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_message(&body);

    // Too many workers.
    let mut too_many = run_body("f", "{}");
    too_many["config"]["workers"] = json!(99);
    let (status, body) = gw.post_json(TOKEN, "programs/run/", &too_many).await;
    assert_eq!(status, 400, "{body}");
    assert_message(&body);

    // Arguments above GATEWAY_MAX_ARGUMENTS_BYTES.
    let big = json!({"x": "y".repeat(2000)}).to_string();
    let (status, body) = gw
        .post_json(TOKEN, "programs/run/", &run_body("f", &big))
        .await;
    assert_eq!(status, 413, "{body}");
    assert_message(&body);

    assert_eq!(count(&gw, "jobs").await, 0, "failed runs insert nothing");
    assert_eq!(count(&gw, "job_events").await, 0);
    // And the limit is not a cap on a normal run.
    let (status, body) = gw
        .post_json(TOKEN, "programs/run/", &run_body("f", "{\"a\": 1}"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&gw, "jobs").await, 1);
    gw.shutdown().await;
}

// ---- one job ------------------------------------------------------------------

#[tokio::test]
async fn job_retrieve_shapes() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    let (_, program) = gw.get(TOKEN, "programs/get_by_title/f/").await;

    // No with_result: the 2023 client reads `result` here.
    let (status, body) = gw.get(TOKEN, &format!("jobs/{id}/")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["status"], "QUEUED");
    assert!(
        body.get("result").is_some_and(Value::is_null),
        "result key present: {body}"
    );
    assert!(body["sub_status"].is_null());
    assert!(is_timestamp(&body["created"]), "{body}");
    for key in ["fleet_id", "compute_profile", "business_model"] {
        assert!(body.get(key).is_some(), "{key}: {body}");
    }
    let p = &body["program"];
    assert_eq!(p["id"], program["id"]);
    assert_eq!(p["title"], "f");
    assert_eq!(p["entrypoint"], "main.py");
    assert!(p["dependencies"].is_string(), "{p}");
    for key in ["artifact", "description", "documentation_url", "type"] {
        assert!(p.get(key).is_some(), "{key}: {p}");
    }
    assert!(p.get("provider").is_none(), "{p}");

    let (status, with_true) = gw.get(TOKEN, &format!("jobs/{id}/?with_result=true")).await;
    assert_eq!(status, 200);
    assert_eq!(with_true, body);

    let (status, body) = gw
        .get(TOKEN, &format!("jobs/{id}/?with_result=false"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("result").is_none(), "{body}");
    assert_eq!(body["program"], json!({"id": program["id"], "title": "f"}));
    assert_eq!(body["status"], "QUEUED");
    // Without the trailing slash too.
    let (status, again) = gw.get(TOKEN, &format!("jobs/{id}?with_result=false")).await;
    assert_eq!((status, &again), (200, &body));
    gw.shutdown().await;
}

#[tokio::test]
async fn job_ids_that_are_not_found() {
    let gw = gateway().await;
    let (status, body) = gw.get(TOKEN, "jobs/not-a-uuid/").await;
    assert_eq!(status, 404, "{body}");
    assert_message(&body);
    let unknown = uuid::Uuid::new_v4();
    let (status, body) = gw.get(TOKEN, &format!("jobs/{unknown}/")).await;
    assert_eq!(
        (status, &body),
        (
            404,
            &json!({"message": format!("Job [{unknown}] not found")})
        )
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn another_users_job_is_404_everywhere() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    let http = reqwest::Client::new();
    let bob = |req: reqwest::RequestBuilder| req.bearer_auth(TOKEN_BOB);
    let requests = [
        ("GET job", bob(http.get(gw.api(&format!("jobs/{id}/"))))),
        (
            "GET logs",
            bob(http.get(gw.api(&format!("jobs/{id}/logs/")))),
        ),
        (
            "GET result",
            bob(http.get(gw.api(&format!("jobs/{id}/result/")))),
        ),
        (
            "POST result",
            bob(http.post(gw.api(&format!("jobs/{id}/result/"))))
                .json(&json!({"result": {"x": 1}})),
        ),
        (
            "POST stop",
            bob(http.post(gw.api(&format!("jobs/{id}/stop/")))).json(&json!({"service": null})),
        ),
        (
            "GET events",
            bob(http.get(gw.api(&format!("jobs/{id}/events/")))),
        ),
        (
            "POST event",
            bob(http.post(gw.api(&format!("jobs/{id}/event/"))))
                .json(&json!({"type": "ERROR", "message": "m", "code": 1, "exception": "E"})),
        ),
        (
            "PATCH sub_status",
            bob(http.patch(gw.api(&format!("jobs/{id}/sub_status/"))))
                .urlencoded(&[("sub_status", "MAPPING")]),
        ),
    ];
    for (what, req) in requests {
        let (status, _, body) = send(req).await;
        assert_eq!(status, 404, "{what}: {body}");
        assert_eq!(
            body,
            json!({"message": format!("Job [{id}] not found")}),
            "{what}"
        );
    }
    // Bob changed nothing.
    let (_, job) = gw.get(TOKEN, &format!("jobs/{id}/")).await;
    assert_eq!(job["status"], "QUEUED");
    assert!(
        job["result"].is_null() && job["sub_status"].is_null(),
        "{job}"
    );
    let errors: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_events WHERE event_type = 'ERROR'")
            .fetch_one(&gw.pool)
            .await
            .unwrap();
    assert_eq!(errors, 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn wrong_method_is_405_json() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    let http = reqwest::Client::new();
    let (status, _, body) = send(
        http.delete(gw.api(&format!("jobs/{id}/")))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 405, "{body}");
    assert_message(&body);
    let (status, _, body) = send(
        http.get(gw.api(&format!("jobs/{id}/stop/")))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 405, "{body}");
    assert_message(&body);
    let (status, _, body) = send(http.put(gw.api("programs/upload/")).bearer_auth(TOKEN)).await;
    assert_eq!(status, 405, "{body}");
    assert_message(&body);
    // The job is still there.
    assert_eq!(gw.job_status(TOKEN, &id).await, "QUEUED");
    gw.shutdown().await;
}

#[tokio::test]
async fn result_post_json_then_get() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    let http = reqwest::Client::new();

    let (status, _, body) = send(
        http.get(gw.api(&format!("jobs/{id}/result/")))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(
        (status, &body),
        (204, &Value::Null),
        "no result yet: 204 with an empty body"
    );

    let (status, body) = gw
        .post_json(
            TOKEN,
            &format!("jobs/{id}/result/"),
            &json!({"result": {"a": 1}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["result"], "{\"a\":1}");
    assert_eq!(body["status"], "QUEUED");
    assert_eq!(body["program"]["title"], "f");

    let stored: Option<String> = sqlx::query_scalar("SELECT result FROM jobs WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&id).unwrap())
        .fetch_one(&gw.pool)
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some("{\"a\":1}"));

    let (status, body) = gw.get(TOKEN, &format!("jobs/{id}/result/")).await;
    assert_eq!((status, &body), (200, &json!({"result": "{\"a\":1}"})));
    let (_, job) = gw.get(TOKEN, &format!("jobs/{id}/")).await;
    assert_eq!(job["result"], "{\"a\":1}");
    // A body without `result` is refused and changes nothing.
    let (status, body) = gw
        .post_json(TOKEN, &format!("jobs/{id}/result/"), &json!({"other": 1}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_message(&body);
    let (_, body) = gw.get(TOKEN, &format!("jobs/{id}/result/")).await;
    assert_eq!(body, json!({"result": "{\"a\":1}"}));
    gw.shutdown().await;
}

#[tokio::test]
async fn result_post_form_string() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    let http = reqwest::Client::new();
    let url = gw.api(&format!("jobs/{id}/result/"));
    // A JSON text, as the 2023 in-job client sends it: kept verbatim.
    let (status, _, body) = send(
        http.post(&url)
            .bearer_auth(TOKEN)
            .urlencoded(&[("result", "{\"b\": [1, 2]}")]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "{\"b\": [1, 2]}");
    let (status, body) = gw.get(TOKEN, &format!("jobs/{id}/result/")).await;
    assert_eq!(
        (status, &body),
        (200, &json!({"result": "{\"b\": [1, 2]}"}))
    );
    // Plain text is stored as a JSON string.
    let (status, _, body) = send(
        http.post(&url)
            .bearer_auth(TOKEN)
            .urlencoded(&[("result", "plain")]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = gw.get(TOKEN, &format!("jobs/{id}/result/")).await;
    assert_eq!(body, json!({"result": "\"plain\""}));
    // Once the job has ended its result is final.
    let (status, _) = gw
        .post_json(TOKEN, &format!("jobs/{id}/stop/"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, _, body) = send(
        http.post(&url)
            .bearer_auth(TOKEN)
            .urlencoded(&[("result", "late")]),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_message(&body);
    let (_, body) = gw.get(TOKEN, &format!("jobs/{id}/result/")).await;
    assert_eq!(body, json!({"result": "\"plain\""}));
    gw.shutdown().await;
}

#[tokio::test]
async fn sub_status_form_and_invalid() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    let http = reqwest::Client::new();
    let url = gw.api(&format!("jobs/{id}/sub_status/"));
    let (status, _, body) = send(
        http.patch(&url)
            .bearer_auth(TOKEN)
            .urlencoded(&[("sub_status", "MAPPING")]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let job = &body["job"];
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["sub_status"], "MAPPING");
    assert_eq!(job["status"], "QUEUED");
    assert_eq!(job["program"]["title"], "f");
    assert!(is_timestamp(&job["created"]), "{job}");

    for bad in [
        &[("sub_status", "BOGUS")][..],
        &[][..],
        &[("other", "MAPPING")][..],
    ] {
        let (status, _, body) = send(http.patch(&url).bearer_auth(TOKEN).urlencoded(bad)).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(
            body,
            json!({"message": "'sub_status' not provided or is not valid"})
        );
    }
    // JSON works too.
    let (status, _, body) = send(
        http.patch(&url)
            .bearer_auth(TOKEN)
            .json(&json!({"sub_status": "WAITING_QPU"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["job"]["sub_status"], "WAITING_QPU");

    let (_, job) = gw
        .get(TOKEN, &format!("jobs/{id}/?with_result=false"))
        .await;
    assert_eq!(job["sub_status"], "WAITING_QPU");
    let (_, events) = gw
        .get(TOKEN, &format!("jobs/{id}/events/?type=SUB_STATUS_CHANGE"))
        .await;
    let subs: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["data"]["sub_status"])
        .collect();
    assert_eq!(
        subs,
        [&json!("WAITING_QPU"), &json!("MAPPING")],
        "newest first"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn error_event_then_events_list() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    let event = json!({"type": "ERROR", "message": "m", "code": 1, "exception": "E"});
    let (status, body) = gw
        .post_json(TOKEN, &format!("jobs/{id}/event/"), &event)
        .await;
    assert_eq!((status, &body), (200, &Value::Null));
    let second =
        json!({"type": "error", "message": "m2", "code": "2", "exception": "E2", "args": [1]});
    let (status, body) = gw
        .post_json(TOKEN, &format!("jobs/{id}/event/"), &second)
        .await;
    assert_eq!((status, &body), (200, &Value::Null));
    // Only ERROR is accepted.
    let (status, body) = gw
        .post_json(
            TOKEN,
            &format!("jobs/{id}/event/"),
            &json!({"type": "INFO"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_message(&body);

    let (status, errors) = gw
        .get(TOKEN, &format!("jobs/{id}/events/?type=ERROR"))
        .await;
    assert_eq!(status, 200, "{errors}");
    let errors = errors.as_array().expect("bare array");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(
        errors[0]["data"]["message"], "m2",
        "newest first: {errors:?}"
    );
    assert_eq!(errors[1]["event_type"], "ERROR");
    assert_eq!(errors[1]["data"]["message"], "m");
    assert_eq!(errors[1]["data"]["exception"], "E");
    assert!(
        errors[1]["data"]["code"] == json!("1") || errors[1]["data"]["code"] == json!(1),
        "{errors:?}"
    );
    assert_eq!(errors[1]["origin"], "API");
    assert_eq!(errors[1]["context"], "SEND_ERROR");
    assert!(is_timestamp(&errors[1]["created"]));

    let (status, all) = gw.get(TOKEN, &format!("jobs/{id}/events/")).await;
    assert_eq!(status, 200);
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    let last = &all[2];
    assert_eq!(last["event_type"], "STATUS_CHANGE");
    assert_eq!(last["data"], json!({"status": "QUEUED"}));
    assert_eq!(last["context"], "RUN_PROGRAM");
    gw.shutdown().await;
}

#[tokio::test]
async fn stop_queued_job_then_terminal() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    // The current client sends a `service`; the 2023 one sends no body.
    let (status, body) = gw
        .post_json(
            TOKEN,
            &format!("jobs/{id}/stop/"),
            &json!({"service": "null"}),
        )
        .await;
    assert_eq!(
        (status, &body),
        (200, &json!({"message": "Job has been stopped."}))
    );
    assert_eq!(gw.job_status(TOKEN, &id).await, "STOPPED");
    let (status, _, body) = send(
        reqwest::Client::new()
            .post(gw.api(&format!("jobs/{id}/stop/")))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(
        (status, &body),
        (200, &json!({"message": "Job already in terminal state."}))
    );

    // No progress reports or error events on a stopped job.
    let (status, _, body) = send(
        reqwest::Client::new()
            .patch(gw.api(&format!("jobs/{id}/sub_status/")))
            .bearer_auth(TOKEN)
            .urlencoded(&[("sub_status", "MAPPING")]),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body,
        json!({"message": "Cannot update 'sub_status' when is not in active status. (Currently STOPPED)"})
    );
    let (status, body) = gw
        .post_json(
            TOKEN,
            &format!("jobs/{id}/event/"),
            &json!({"type": "ERROR", "message": "m", "code": 1, "exception": "E"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_message(&body);

    let (_, events) = gw
        .get(TOKEN, &format!("jobs/{id}/events/?type=STATUS_CHANGE"))
        .await;
    let statuses: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["data"]["status"])
        .collect();
    assert_eq!(statuses, [&json!("STOPPED"), &json!("QUEUED")]);
    gw.shutdown().await;
}

#[tokio::test]
async fn logs_of_a_queued_job() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    let (status, body) = gw.get(TOKEN, &format!("jobs/{id}/logs/")).await;
    assert_eq!((status, &body), (200, &json!({"logs": "No logs yet."})));
    gw.shutdown().await;
}

// ---- the job list -------------------------------------------------------------

#[tokio::test]
async fn job_list_pagination_and_filters() {
    let gw = gateway().await;
    upload_main(&gw, TOKEN, "f1").await;
    upload_main(&gw, TOKEN, "f2").await;
    upload_main(&gw, TOKEN_BOB, "f1").await;
    let mut ids = Vec::new(); // oldest first
    for i in 0..12 {
        let title = if i % 3 == 0 { "f2" } else { "f1" }; // f1: 8 jobs, f2: 4 jobs
        ids.push(gw.run(TOKEN, title, &json!({"i": i})).await);
    }
    // Stop 3 of them: ids[1] (f1), ids[3] (f2), ids[4] (f1).
    for i in [1, 3, 4] {
        let (status, body) = gw
            .post_json(TOKEN, &format!("jobs/{}/stop/", ids[i]), &json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    let page_ids = |page: &Value| -> Vec<String> {
        page["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };

    let (status, page) = gw.get(TOKEN, "jobs/?limit=5&offset=0").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["count"], 12);
    assert_eq!(page_ids(&page), newest_first[..5]);
    assert_eq!(
        page["next"],
        format!("{}/api/v1/jobs/?limit=5&offset=5", gw.url)
    );
    assert!(page["previous"].is_null(), "{page}");
    let item = &page["results"][0];
    assert_eq!(item["status"], "QUEUED");
    assert_eq!(item["program"]["title"], "f1");
    assert!(is_uuid(&item["program"]["id"]));
    assert!(
        item["program"].get("provider").is_some_and(Value::is_null),
        "list shows provider: null: {item}"
    );
    assert!(is_timestamp(&item["created"]));
    assert!(
        item.get("sub_status").is_some() && item.get("compute_profile").is_some(),
        "{item}"
    );

    // Following `next` works as is.
    let next = page["next"].as_str().unwrap();
    let (status, _, page2) = send(reqwest::Client::new().get(next).bearer_auth(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(page_ids(&page2), newest_first[5..10]);

    let (status, page) = gw.get(TOKEN, "jobs/?limit=5&offset=10").await;
    assert_eq!(status, 200);
    assert_eq!(page["count"], 12);
    assert_eq!(page_ids(&page), newest_first[10..]);
    assert!(page["next"].is_null(), "{page}");
    assert_eq!(
        page["previous"],
        format!("{}/api/v1/jobs/?limit=5&offset=5", gw.url)
    );

    // Defaults: everything (limit 100), without the trailing slash too.
    let (status, page) = gw.get(TOKEN, "jobs").await;
    assert_eq!(status, 200);
    assert_eq!(page_ids(&page), newest_first);
    assert!(
        page["next"].is_null() && page["previous"].is_null(),
        "{page}"
    );

    // By function.
    let (_, page) = gw.get(TOKEN, "jobs/?function=f1&limit=100").await;
    assert_eq!(page["count"], 8);
    assert!(
        page["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["program"]["title"] == "f1"),
        "{page}"
    );
    let (_, page) = gw.get(TOKEN, "jobs/?function=f2").await;
    assert_eq!(page["count"], 4);
    assert_eq!(
        page_ids(&page),
        [ids[9].as_str(), &ids[6], &ids[3], &ids[0]]
    );

    // By status, with the gateway's name and the client's alias.
    let stopped = [ids[4].as_str(), &ids[3], &ids[1]];
    for status_name in ["STOPPED", "CANCELED"] {
        let (status, page) = gw.get(TOKEN, &format!("jobs/?status={status_name}")).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["count"], 3, "{status_name}");
        assert_eq!(page_ids(&page), stopped, "{status_name}");
        assert!(
            page["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|j| j["status"] == "STOPPED")
        );
    }
    let (_, page) = gw.get(TOKEN, "jobs/?status=QUEUED&function=f1").await;
    assert_eq!(page["count"], 6);

    // created_after: inclusive, and in the future nothing.
    let (_, all) = gw.get(TOKEN, "jobs/").await;
    let fifth_newest = all["results"][4]["created"].as_str().unwrap().to_string();
    let (status, page) = gw
        .get(
            TOKEN,
            &format!("jobs/?created_after={}", fifth_newest.replace('+', "%2B")),
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["count"], 5, "created_after is inclusive: {page}");
    assert_eq!(page_ids(&page), newest_first[..5]);
    let (status, page) = gw
        .get(TOKEN, "jobs/?created_after=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["count"], 0);
    assert_eq!(page["results"], json!([]));

    // Bad input.
    for bad in [
        "jobs/?limit=abc",
        "jobs/?offset=-1",
        "jobs/?status=BOGUS",
        "jobs/?created_after=yesterday",
    ] {
        let (status, body) = gw.get(TOKEN, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_message(&body);
    }
    let (status, body) = gw.get(TOKEN, "jobs/?function=unknown").await;
    assert_eq!(
        (status, &body),
        (
            404,
            &json!({"message": "Qiskit Function unknown doesn't exist."})
        )
    );

    // Bob has a function of the same name, but no jobs.
    let (status, page) = gw.get(TOKEN_BOB, "jobs/").await;
    assert_eq!(status, 200);
    assert_eq!(page["count"], 0);
    assert_eq!(page["results"], json!([]));
    let (_, page) = gw.get(TOKEN_BOB, "jobs/?function=f1").await;
    assert_eq!(page["count"], 0);
    gw.shutdown().await;
}

// ---- odd requests -------------------------------------------------------------

#[tokio::test]
async fn unsupported_content_types_are_415_json() {
    let gw = gateway().await;
    let id = queued_job(&gw).await;
    let http = reqwest::Client::new();
    let cases = [
        (
            "run as text",
            http.post(gw.api("programs/run/"))
                .header("Content-Type", "text/plain")
                .body("{\"title\": \"f\"}"),
        ),
        (
            "upload as JSON",
            http.post(gw.api("programs/upload/"))
                .json(&json!({"title": "g", "entrypoint": "main.py"})),
        ),
        (
            "event as form",
            http.post(gw.api(&format!("jobs/{id}/event/")))
                .urlencoded(&[("type", "ERROR"), ("message", "m")]),
        ),
        (
            "result as XML",
            http.post(gw.api(&format!("jobs/{id}/result/")))
                .header("Content-Type", "application/xml")
                .body("<r/>"),
        ),
    ];
    for (what, req) in cases {
        let (status, _, body) = send(req.bearer_auth(TOKEN)).await;
        assert_eq!(status, 415, "{what}: {body}");
        assert_message(&body);
    }
    assert_eq!(count(&gw, "programs").await, 1);
    assert_eq!(count(&gw, "jobs").await, 1);
    let (_, job) = gw.get(TOKEN, &format!("jobs/{id}/")).await;
    assert!(job["result"].is_null(), "{job}");
    gw.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_are_404_json() {
    let gw = gateway().await;
    for path in ["nope/", "programs/get_by_title/", "jobs/x/y/z/"] {
        let (status, body) = gw.get(TOKEN, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_message(&body);
    }
    gw.shutdown().await;
}

/// Provider functions are not served: they answer like an unknown
/// function, with the original's message naming `provider/title`.
#[tokio::test]
async fn provider_functions_are_unknown_functions() {
    let gw = gateway().await;
    upload_main(&gw, TOKEN, "t").await;
    let not_found = json!({"message": "Qiskit Function p/t doesn't exist."});
    let (status, body) = gw.get(TOKEN, "programs/get_by_title/t/?provider=p").await;
    assert_eq!((status, &body), (404, &not_found));
    let (status, body) = gw
        .post_json(
            TOKEN,
            "programs/run/",
            &json!({"title": "t", "provider": "p", "arguments": "{}", "config": {}}),
        )
        .await;
    assert_eq!((status, &body), (404, &not_found));
    let (status, body) = gw
        .post_json(TOKEN, "programs/run/", &run_body("p/t", "{}"))
        .await;
    assert_eq!((status, &body), (404, &not_found));
    let form = upload_form("t", "main.py", tar_of(&[("main.py", MAIN)]), "artifact.tar")
        .text("provider", "p");
    let (status, body) = gw.post_form(TOKEN, "programs/upload/", form).await;
    assert_eq!((status, &body), (404, &not_found));
    let (status, body) = gw
        .post_form(
            TOKEN,
            "programs/upload/",
            upload_form("p/t", "main.py", tar_of(&[("main.py", MAIN)]), "a.tar"),
        )
        .await;
    assert_eq!((status, &body), (404, &not_found));
    assert_eq!(count(&gw, "programs").await, 1);
    assert_eq!(count(&gw, "jobs").await, 0);

    // Lists: the catalog and a provider's functions are empty, not the caller's own.
    gw.run(TOKEN, "t", &json!({})).await;
    let (_, own) = gw.get(TOKEN, "programs/").await;
    assert_eq!(own.as_array().map(Vec::len), Some(1), "{own}");
    for (path, expected) in [
        ("programs/?filter=serverless", own.clone()),
        ("programs/?filter=anything", own.clone()),
        ("programs/?filter=catalog", json!([])),
        ("programs?provider=p", json!([])),
    ] {
        let (status, body) = gw.get(TOKEN, path).await;
        assert_eq!((status, &body), (200, &expected), "{path}");
    }
    let (status, page) = gw.get(TOKEN, "jobs/?provider=p").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!((&page["count"], &page["results"]), (&json!(0), &json!([])));
    let (status, page) = gw.get(TOKEN, "jobs/?filter=catalog").await;
    assert_eq!((status, &page["count"]), (200, &json!(0)));
    let (status, page) = gw.get(TOKEN, "jobs/?filter=serverless").await;
    assert_eq!((status, &page["count"]), (200, &json!(1)));
    let (status, body) = gw.get(TOKEN, "jobs/?provider=p&function=t").await;
    assert_eq!((status, &body), (404, &not_found));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_new_entrypoint_without_an_artifact_must_be_in_the_stored_one() {
    let gw = gateway().await;
    let (status, _) = gw
        .upload(
            TOKEN,
            "twofiles",
            &[("main.py", "print(1)"), ("other.py", "print(2)")],
        )
        .await;
    assert_eq!(status, 200);
    let form = |entry: &str| {
        reqwest::multipart::Form::new()
            .text("title", "twofiles")
            .text("entrypoint", entry.to_string())
    };
    let (status, body) = gw
        .post_form(TOKEN, "programs/upload/", form("missing.py"))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("missing.py"),
        "{body}"
    );
    let (_, program) = gw.get(TOKEN, "programs/get_by_title/twofiles/").await;
    assert_eq!(
        program["entrypoint"], "main.py",
        "a rejected upload changes nothing"
    );
    let (status, body) = gw
        .post_form(TOKEN, "programs/upload/", form("other.py"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entrypoint"], "other.py");
    gw.shutdown().await;
}

#[tokio::test]
async fn processes_with_another_secret_key_refuse_to_start() {
    let gw = gateway().await;
    let mut vars = gw.vars.clone();
    vars.insert("GATEWAY_SECRET_KEY".into(), "another-key".into());
    let config = || shared::config::Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let api = api::startup::Application::build(config()).await;
    let err = api
        .err()
        .expect("an API with another key must not start")
        .to_string();
    assert!(err.contains("GATEWAY_SECRET_KEY is not the key"), "{err}");
    let worker = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        worker::run(config(), std::future::pending()),
    )
    .await
    .expect("the worker gives up at once");
    let err = worker
        .expect_err("a worker with another key must not start")
        .to_string();
    assert!(err.contains("GATEWAY_SECRET_KEY is not the key"), "{err}");
    // The right key still starts.
    let same = gw.vars.clone();
    assert!(
        api::startup::Application::build(
            shared::config::Config::from_lookup(|k| same.get(k).cloned()).unwrap()
        )
        .await
        .is_ok()
    );
    gw.shutdown().await;
}
