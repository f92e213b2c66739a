//! The secrets a job runs with, sealed at `programs/run` and opened by the
//! worker that submits it; and the environment built from them
//! (API_CONTRACT.md §3, both SDK generations).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::secrets::{SecretBox, SecretError};

/// What the API knows at run time and the worker needs at submit time.
/// Sealed as one JSON document; never logged.
#[derive(Clone, Serialize, Deserialize)]
pub struct JobSecrets {
    pub token: String,
    pub channel: String,
    pub instance: Option<String>,
    /// `ENV_JOB_GATEWAY_HOST`: the gateway as the function reaches it.
    pub gateway_host: String,
}

impl std::fmt::Debug for JobSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSecrets")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl JobSecrets {
    pub fn seal(&self, secrets: &SecretBox) -> Result<Vec<u8>, SecretError> {
        let plain = serde_json::to_vec(self).map_err(|_| SecretError::Encrypt)?;
        secrets.seal(&plain)
    }
    pub fn open(sealed: &[u8], secrets: &SecretBox) -> Result<Self, SecretError> {
        serde_json::from_slice(&secrets.open(sealed)?).map_err(|_| SecretError::Decrypt)
    }
}

/// Linux caps one environment string at 128 KiB; arguments above this go
/// only through the arguments file.
pub const ENV_ARGUMENTS_MAX: usize = 100 * 1024;

/// Where a job's files live under the data dir, as the gateway sees it and
/// as the Ray node sees it.
pub fn user_data_dir(root: &Path, username: &str) -> std::path::PathBuf {
    root.join(username)
}

pub fn arguments_file(root: &Path, username: &str, job_id: Uuid) -> std::path::PathBuf {
    user_data_dir(root, username)
        .join("arguments")
        .join(format!("{job_id}.json"))
}

pub fn results_file(root: &Path, username: &str, job_id: Uuid) -> std::path::PathBuf {
    user_data_dir(root, username)
        .join("results")
        .join(format!("{job_id}.json"))
}

/// The job's environment. System variables win over the function's own
/// (the original let a function override `ENV_JOB_GATEWAY_HOST` and friends).
pub fn build_env(
    job_id: Uuid,
    username: &str,
    arguments: &str,
    secrets: &JobSecrets,
    ray_data_root: &Path,
    function_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = function_env.clone();
    let data_path = user_data_dir(ray_data_root, username);
    let args_env = if arguments.len() <= ENV_ARGUMENTS_MAX {
        arguments.to_string()
    } else {
        "{}".to_string()
    };
    let system = [
        ("ENV_JOB_GATEWAY_TOKEN", secrets.token.clone()),
        ("ENV_JOB_GATEWAY_HOST", secrets.gateway_host.clone()),
        ("ENV_JOB_ID_GATEWAY", job_id.to_string()),
        ("ENV_JOB_ARGUMENTS", args_env),
        ("ENV_ACCESS_TRIAL", "False".to_string()),
        ("DATA_PATH", data_path.display().to_string()),
        (
            "ARGUMENTS_PATH",
            arguments_file(ray_data_root, username, job_id)
                .display()
                .to_string(),
        ),
        (
            "RESULTS_PATH",
            results_file(ray_data_root, username, job_id)
                .display()
                .to_string(),
        ),
        ("QISKIT_IBM_TOKEN", secrets.token.clone()),
        ("QISKIT_IBM_CHANNEL", secrets.channel.clone()),
    ];
    for (k, v) in system {
        env.insert(k.to_string(), v);
    }
    if let Some(instance) = &secrets.instance {
        env.insert("QISKIT_IBM_INSTANCE".into(), instance.clone());
        env.insert("ENV_JOB_GATEWAY_INSTANCE".into(), instance.clone());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> JobSecrets {
        JobSecrets {
            token: "tok".into(),
            channel: "local".into(),
            instance: None,
            gateway_host: "http://gw".into(),
        }
    }

    #[test]
    fn system_variables_win_and_paths_are_per_user() {
        let id = Uuid::nil();
        let mut f = BTreeMap::new();
        f.insert(
            "ENV_JOB_GATEWAY_HOST".to_string(),
            "http://evil".to_string(),
        );
        f.insert("MY_VAR".to_string(), "1".to_string());
        let env = build_env(
            id,
            "alice",
            "{\"a\": 1}",
            &secrets(),
            Path::new("/data"),
            &f,
        );
        assert_eq!(env["ENV_JOB_GATEWAY_HOST"], "http://gw");
        assert_eq!(env["MY_VAR"], "1");
        assert_eq!(env["ENV_JOB_ARGUMENTS"], "{\"a\": 1}");
        assert_eq!(env["DATA_PATH"], "/data/alice");
        assert_eq!(
            env["ARGUMENTS_PATH"],
            format!("/data/alice/arguments/{id}.json")
        );
        assert_eq!(
            env["RESULTS_PATH"],
            format!("/data/alice/results/{id}.json")
        );
        assert!(!env.contains_key("ENV_JOB_GATEWAY_INSTANCE"));
    }

    #[test]
    fn large_arguments_stay_out_of_the_environment() {
        let big = format!("\"{}\"", "x".repeat(ENV_ARGUMENTS_MAX + 1));
        let env = build_env(
            Uuid::nil(),
            "a",
            &big,
            &secrets(),
            Path::new("/d"),
            &BTreeMap::new(),
        );
        assert_eq!(env["ENV_JOB_ARGUMENTS"], "{}");
    }

    #[test]
    fn sealed_secrets_round_trip_and_debug_hides_the_token() {
        let b = SecretBox::new("k");
        let sealed = secrets().seal(&b).unwrap();
        assert_eq!(JobSecrets::open(&sealed, &b).unwrap().token, "tok");
        assert!(!format!("{:?}", secrets()).contains("tok"));
    }
}
