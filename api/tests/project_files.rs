//! The committed files that describe the gateway stay true to the code:
//! the OpenAPI document, `compose.yaml` and README's configuration table.

use std::collections::BTreeSet;
use std::path::PathBuf;

use shared::config::{Backend, Config, VARIABLES};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn committed_openapi_document_matches_the_served_one() {
    let served = api::startup::openapi_json();
    let path = repo_file("openapi/openapi.json");
    if std::env::var("UPDATE_OPENAPI").is_ok_and(|v| v == "1") {
        std::fs::write(&path, format!("{served}\n")).expect("write openapi/openapi.json");
    }
    let committed = std::fs::read_to_string(&path).expect("openapi/openapi.json exists");
    assert!(
        committed.trim_end() == served.trim_end(),
        "openapi/openapi.json is stale: regenerate it with `UPDATE_OPENAPI=1 cargo test -p gateway-api --test project_files`"
    );
    let doc: serde_json::Value = serde_json::from_str(&committed).expect("valid JSON");
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/programs",
        "/programs/upload",
        "/programs/run",
        "/jobs",
        "/jobs/{id}",
        "/jobs/{id}/result",
        "/jobs/{id}/stop",
    ] {
        assert!(paths.contains_key(p), "{p} documented");
    }
}

/// `${NAME:-default}` as compose resolves it with nothing set.
fn compose_default(value: &str) -> String {
    match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
        Some(inner) => inner
            .split_once(":-")
            .map(|(_, d)| d.to_string())
            .unwrap_or_default(),
        None => value.to_string(),
    }
}

#[test]
fn compose_file_runs_the_gateway_with_variables_the_code_reads() {
    let text = std::fs::read_to_string(repo_file("compose.yaml")).expect("compose.yaml exists");
    let mut doc: serde_norway::Value = serde_norway::from_str(&text).expect("compose.yaml is YAML");
    doc.apply_merge().expect("merge keys resolve");
    let services = doc["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["api", "postgres", "ray-head", "redis", "worker"])
    );
    assert_eq!(
        doc["services"]["worker"]["deploy"]["replicas"].as_u64(),
        Some(2),
        "two workers"
    );
    assert_eq!(
        doc["services"]["api"]["command"][0].as_str(),
        Some("gateway-api")
    );
    assert_eq!(
        doc["services"]["worker"]["command"][0].as_str(),
        Some("gateway-worker")
    );

    let known: BTreeSet<&str> = VARIABLES.iter().map(|(n, _, _)| *n).collect();
    for service in ["api", "worker"] {
        let env = doc["services"][service]["environment"]
            .as_mapping()
            .expect("environment");
        let vars: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| {
                let k = k.as_str().expect("variable name").to_string();
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| v.as_u64().map(|n| n.to_string()))
                    .unwrap_or_default();
                (k, compose_default(&v))
            })
            .collect();
        for name in vars.keys() {
            assert!(
                known.contains(name.as_str()),
                "{service}: {name} is not a variable the gateway reads"
            );
        }
        let config = Config::from_lookup(|k| vars.get(k).cloned()).unwrap_or_else(|e| {
            panic!("{service}'s environment is not a valid configuration: {e}")
        });
        assert!(
            matches!(config.backend, Backend::Distributed { .. }),
            "{service} uses Postgres and Redis"
        );
        assert!(config.ray.local_mode);
        assert_eq!(config.ray.local_host, "http://ray-head:8265");
        assert_eq!(config.data_dir, PathBuf::from("/data"));
    }
}

#[test]
fn readme_documents_every_variable_and_the_test_command() {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("README.md exists");
    for (name, _, _) in VARIABLES {
        assert!(
            readme.contains(&format!("`{name}`")),
            "README documents {name}"
        );
    }
    let ci = std::fs::read_to_string(repo_file(".ci/run")).expect(".ci/run exists");
    assert!(
        ci.contains("scripts/test.sh") && readme.contains("scripts/test.sh"),
        "README's test command is what CI runs"
    );
}
