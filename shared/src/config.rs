//! Configuration from environment variables, with the original gateway's names
//! where one exists (DESIGN.md §10, API_CONTRACT.md §6).
//!
//! Everything is read through [`Config::from_lookup`] so tests can build a
//! configuration from a map instead of mutating the process environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A configuration mistake, reported as one line before the process exits.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("{0}")]
    Inconsistent(String),
}

fn invalid(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        reason: reason.into(),
    }
}

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Postgres for state, Redis for queues and limits: the production shape.
    Distributed {
        database_url: String,
        redis_url: String,
    },
    /// No database and no Redis configured: the single-process gateway.
    Embedded,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMechanism {
    /// Static bearer tokens mapped to users.
    MockToken { tokens: BTreeMap<String, String> },
    /// Keycloak JWTs (the original's `default`).
    Keycloak,
    /// External token verification (the original's `custom_token`).
    CustomToken,
}

/// Where jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerKind {
    /// The Ray Jobs API of the head at `ray.local_host`.
    Ray,
    /// `python <entrypoint>` as a local process (the embedded gateway without a Ray head).
    LocalProcess,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// PENDING + RUNNING jobs per user (`LIMITS_JOBS_PER_USER`).
    pub jobs_per_user: u32,
    /// Clusters alive at once; in local mode, concurrent jobs on the head.
    pub max_clusters: u32,
    /// QUEUED + PENDING + RUNNING jobs per user, checked at submit (429).
    pub active_jobs_per_user: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RayConfig {
    /// One pre-existing Ray head instead of clusters through KubeRay.
    pub local_mode: bool,
    /// Dashboard URL of the local head.
    pub local_host: String,
    pub kuberay_namespace: String,
    pub node_image: String,
    pub max_readiness: Duration,
}

/// Knobs of the worker processes. Defaults favour low latency on one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerTuning {
    /// Dispatch tasks handled at once per worker process.
    pub concurrency: usize,
    /// apalis heartbeat; a dead worker's task is redelivered after
    /// `heartbeat * missed_heartbeats`.
    pub heartbeat: Duration,
    pub missed_heartbeats: usize,
    /// How often running jobs are polled on Ray.
    pub track_interval: Duration,
    /// Lifetime of a slot lease; renewed by its holder well before it ends.
    pub lease_ttl: Duration,
    /// How long a dispatch claim on a job lasts without renewal.
    pub claim_ttl: Duration,
    /// Period of the reconciler that re-enqueues QUEUED jobs nobody holds.
    pub reconcile_interval: Duration,
    /// How long Ray keeps an ended job (its runtime_env holds the job's
    /// token) before the reconciler deletes it there.
    pub ray_job_retention: Duration,
    /// Test hook: a pause inside dispatch, after the package upload and
    /// before the submit, to exercise stop-during-dispatch. Zero in production.
    pub dispatch_pause: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub backend: Backend,
    pub listen: SocketAddr,
    /// Public URL of the gateway as functions see it (`ENV_JOB_GATEWAY_HOST`).
    /// `None` means "http:// + the address the API bound".
    pub site_host: Option<String>,
    /// Prefix of every Redis key this deployment writes (queues, leases).
    pub redis_prefix: String,
    pub data_dir: PathBuf,
    /// The same directory as the Ray node sees it.
    pub ray_data_path: PathBuf,
    pub auth: AuthMechanism,
    /// Embedded gateway with no token configured: one is generated once and
    /// kept under the data dir.
    pub generate_token: bool,
    pub secret_key: Option<String>,
    pub runner: RunnerKind,
    pub limits: Limits,
    pub ray: RayConfig,
    pub logs_size_limit: usize,
    pub max_artifact_bytes: u64,
    pub max_arguments_bytes: usize,
    pub debug: bool,
    pub log_json: bool,
    pub version: String,
    pub worker: WorkerTuning,
    pub python: String,
}

pub const DEFAULT_MOCK_TOKEN: &str = "awesome_token";
const MIB: u64 = 1024 * 1024;

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get`, which returns a variable's value.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // Empty values count as unset, as in a compose file with `VAR=`.
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let debug = parse_bool_opt(&get, "DEBUG")?.unwrap_or(false);

        let backend = backend(&get)?;
        let listen_raw = get("GATEWAY_LISTEN").unwrap_or_else(|| "127.0.0.1:8000".into());
        let listen: SocketAddr = listen_raw
            .parse()
            .map_err(|_| invalid("GATEWAY_LISTEN", format!("'{listen_raw}' is not host:port")))?;
        let site_host = get("SITE_HOST").map(|s| s.trim_end_matches('/').to_string());

        let data_dir = absolute(PathBuf::from(
            get("GATEWAY_DATA_DIR").unwrap_or_else(|| "./data".into()),
        ))
        .map_err(|e| invalid("GATEWAY_DATA_DIR", e))?;
        let ray_data_path = get("RAY_DATA_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| data_dir.clone());

        let embedded = backend == Backend::Embedded;
        let generate_token = embedded
            && get("SETTINGS_AUTH_MOCK_TOKEN").is_none()
            && get("SETTINGS_AUTH_MOCK_TOKENS").is_none();
        let auth = match get("SETTINGS_AUTH_MECHANISM").as_deref() {
            Some("mock_token") => mock_tokens(&get)?,
            Some("default") => AuthMechanism::Keycloak,
            Some("custom_token") => AuthMechanism::CustomToken,
            None => match backend {
                Backend::Embedded => mock_tokens(&get)?,
                Backend::Distributed { .. } => AuthMechanism::Keycloak,
            },
            Some(other) => {
                return Err(invalid(
                    "SETTINGS_AUTH_MECHANISM",
                    format!("'{other}' is not one of default, custom_token, mock_token"),
                ));
            }
        };
        match &auth {
            AuthMechanism::Keycloak => {
                return Err(invalid(
                    "SETTINGS_AUTH_MECHANISM",
                    "'default' (Keycloak) is not available in this release; set SETTINGS_AUTH_MECHANISM=mock_token",
                ));
            }
            AuthMechanism::CustomToken => {
                return Err(invalid(
                    "SETTINGS_AUTH_MECHANISM",
                    "'custom_token' is not available in this release; set SETTINGS_AUTH_MECHANISM=mock_token",
                ));
            }
            AuthMechanism::MockToken { tokens } => {
                let uses_default = tokens.contains_key(DEFAULT_MOCK_TOKEN);
                if uses_default && !debug && !listen.ip().is_loopback() {
                    return Err(invalid(
                        "SETTINGS_AUTH_MOCK_TOKEN",
                        "the well-known default token is refused on a non-loopback address; set a token of your own (or DEBUG=1)",
                    ));
                }
            }
        }

        let secret_key = get("GATEWAY_SECRET_KEY").or_else(|| get("DJANGO_SECRET_KEY"));
        if secret_key.is_none() && !debug && matches!(backend, Backend::Distributed { .. }) {
            return Err(invalid(
                "GATEWAY_SECRET_KEY",
                "required with a database (it encrypts job tokens at rest); set it, or DEBUG=1 for a development key",
            ));
        }

        let limits = Limits {
            jobs_per_user: parse_num(&get, "LIMITS_JOBS_PER_USER", 2)?,
            max_clusters: parse_num(&get, "LIMITS_MAX_CLUSTERS", 6)?,
            active_jobs_per_user: parse_num(&get, "LIMITS_ACTIVE_JOBS_PER_USER", 50)?,
        };

        let local_mode = parse_bool_opt(&get, "RAY_CLUSTER_MODE_LOCAL")?.unwrap_or(false);
        let configured_head = get("RAY_CLUSTER_MODE_LOCAL_HOST")
            .or_else(|| get("RAY_LOCAL_HOST"))
            .or_else(|| get("RAY_HOST"));
        // The embedded gateway runs functions itself unless a Ray head is named.
        let runner = if embedded && configured_head.is_none() {
            RunnerKind::LocalProcess
        } else {
            RunnerKind::Ray
        };
        let local_host = configured_head
            .unwrap_or_else(|| "http://localhost:8265".into())
            .trim_end_matches('/')
            .to_string();
        if matches!(backend, Backend::Distributed { .. }) && !local_mode {
            return Err(invalid(
                "RAY_CLUSTER_MODE_LOCAL",
                "KubeRay clusters are not available in this release; set RAY_CLUSTER_MODE_LOCAL=1 and RAY_CLUSTER_MODE_LOCAL_HOST",
            ));
        }
        let ray = RayConfig {
            local_mode,
            local_host,
            kuberay_namespace: get("RAY_KUBERAY_NAMESPACE")
                .unwrap_or_else(|| "qiskit-serverless".into()),
            node_image: get("RAY_NODE_IMAGE").unwrap_or_else(|| {
                "icr.io/quantum-public/qiskit-serverless/ray-node:0.37.0".into()
            }),
            max_readiness: Duration::from_secs(parse_num(
                &get,
                "RAY_CLUSTER_MAX_READINESS_TIME",
                480u64,
            )?),
        };

        let worker = WorkerTuning {
            concurrency: parse_num(&get, "GATEWAY_WORKER_CONCURRENCY", 16usize)?.max(1),
            heartbeat: Duration::from_millis(
                parse_num(&get, "GATEWAY_QUEUE_HEARTBEAT_MS", 1000u64)?.max(100),
            ),
            missed_heartbeats: parse_num(&get, "GATEWAY_QUEUE_MISSED_HEARTBEATS", 3usize)?.max(2),
            track_interval: Duration::from_millis(
                parse_num(&get, "GATEWAY_TRACK_INTERVAL_MS", 150u64)?.max(20),
            ),
            lease_ttl: Duration::from_secs(
                parse_num(&get, "GATEWAY_LEASE_TTL_SECONDS", 30u64)?.max(3),
            ),
            claim_ttl: Duration::from_secs(
                parse_num(&get, "GATEWAY_CLAIM_TTL_SECONDS", 5u64)?.max(2),
            ),
            reconcile_interval: Duration::from_millis(
                parse_num(&get, "GATEWAY_RECONCILE_INTERVAL_MS", 1000u64)?.max(100),
            ),
            // Ray undoes a delete made within ~2 s of a job's end (its job
            // monitor writes the job back), hence the floor.
            ray_job_retention: Duration::from_secs(
                parse_num(&get, "GATEWAY_RAY_JOB_RETENTION_SECONDS", 600u64)?.max(5),
            ),
            dispatch_pause: Duration::from_millis(parse_num(
                &get,
                "GATEWAY_TEST_DISPATCH_PAUSE_MS",
                0u64,
            )?),
        };

        Ok(Config {
            backend,
            listen,
            site_host,
            redis_prefix: get("GATEWAY_REDIS_PREFIX").unwrap_or_else(|| "qsgw".into()),
            data_dir,
            ray_data_path,
            auth,
            generate_token,
            secret_key,
            runner,
            limits,
            ray,
            logs_size_limit: parse_num(&get, "FUNCTIONS_LOGS_SIZE_LIMIT", 50 * MIB as usize)?,
            max_artifact_bytes: parse_num(&get, "GATEWAY_MAX_ARTIFACT_BYTES", 100 * MIB)?,
            max_arguments_bytes: parse_num(&get, "GATEWAY_MAX_ARGUMENTS_BYTES", MIB as usize)?,
            debug,
            log_json: get("LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json")),
            version: get("VERSION").unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
            worker,
            python: get("GATEWAY_PYTHON").unwrap_or_else(|| "python3".into()),
        })
    }

    /// `SITE_HOST`, or the URL of the address the API actually bound.
    pub fn site_host_or(&self, bound: SocketAddr) -> String {
        self.site_host
            .clone()
            .unwrap_or_else(|| format!("http://{bound}"))
    }
}

fn backend(get: &impl Fn(&str) -> Option<String>) -> Result<Backend, ConfigError> {
    let database_url = match get("DATABASE_URL") {
        Some(url) => Some(url),
        None => get("DATABASE_HOST").map(|host| {
            let port = get("DATABASE_PORT").unwrap_or_else(|| "5432".into());
            let name = get("DATABASE_NAME").unwrap_or_else(|| "serverlessdb".into());
            let user = get("DATABASE_USER").unwrap_or_else(|| "serverlessuser".into());
            let password = get("DATABASE_PASSWORD").unwrap_or_else(|| "serverlesspassword".into());
            format!(
                "postgres://{}:{}@{host}:{port}/{name}",
                url_escape(&user),
                url_escape(&password)
            )
        }),
    };
    match (database_url, get("REDIS_URL")) {
        (Some(database_url), Some(redis_url)) => Ok(Backend::Distributed { database_url, redis_url }),
        (None, None) => Ok(Backend::Embedded),
        (Some(_), None) => Err(ConfigError::Inconsistent(
            "a database is configured but REDIS_URL is not: set both (distributed gateway) or neither (embedded gateway)".into(),
        )),
        (None, Some(_)) => Err(ConfigError::Inconsistent(
            "REDIS_URL is set but no database is: set DATABASE_URL too (distributed gateway) or neither (embedded gateway)".into(),
        )),
    }
}

fn mock_tokens(get: &impl Fn(&str) -> Option<String>) -> Result<AuthMechanism, ConfigError> {
    let mut tokens = BTreeMap::new();
    if let Some(list) = get("SETTINGS_AUTH_MOCK_TOKENS") {
        for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (token, user) = pair.split_once('=').ok_or_else(|| {
                invalid(
                    "SETTINGS_AUTH_MOCK_TOKENS",
                    "expected token=user,token=user",
                )
            })?;
            let (token, user) = (token.trim(), user.trim());
            if token.is_empty() || !crate::domain::valid_username(user) {
                return Err(invalid(
                    "SETTINGS_AUTH_MOCK_TOKENS",
                    "each entry needs a token and a user name of letters, digits, '.', '_', '-', '@'",
                ));
            }
            tokens.insert(token.to_string(), user.to_string());
        }
    }
    let single = get("SETTINGS_AUTH_MOCK_TOKEN");
    let embedded = get("DATABASE_URL").is_none() && get("DATABASE_HOST").is_none();
    if single.is_some() || (tokens.is_empty() && !embedded) {
        tokens.insert(
            single.unwrap_or_else(|| DEFAULT_MOCK_TOKEN.into()),
            "mockuser".into(),
        );
    }
    Ok(AuthMechanism::MockToken { tokens })
}

fn parse_bool_opt(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<bool>, ConfigError> {
    match get(name) {
        None => Ok(None),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" => Ok(Some(true)),
            "0" | "false" => Ok(Some(false)),
            _ => Err(invalid(
                name,
                format!("'{v}' is not a boolean (1, 0, true, false)"),
            )),
        },
    }
}

fn parse_num<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    match get(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| invalid(name, format!("'{v}' is not a non-negative whole number"))),
    }
}

fn absolute(path: PathBuf) -> Result<PathBuf, String> {
    // Also drops `.` components: `./data` is shown as `<cwd>/data`.
    std::path::absolute(&path).map_err(|e| format!("cannot resolve {}: {e}", path.display()))
}

/// A URL fit for messages and logs: credentials are dropped.
pub fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every variable the gateway reads: (name, default, meaning). README's
/// configuration table and `compose.yaml` are checked against this list.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    (
        "DATABASE_URL",
        "unset",
        "Postgres URL; with REDIS_URL selects the distributed gateway",
    ),
    (
        "DATABASE_HOST",
        "unset",
        "Postgres host (the original's form; used when DATABASE_URL is unset)",
    ),
    ("DATABASE_PORT", "5432", "Postgres port"),
    ("DATABASE_NAME", "serverlessdb", "Postgres database"),
    ("DATABASE_USER", "serverlessuser", "Postgres user"),
    (
        "DATABASE_PASSWORD",
        "serverlesspassword",
        "Postgres password",
    ),
    (
        "REDIS_URL",
        "unset",
        "Redis URL for the queue and the slot leases",
    ),
    (
        "GATEWAY_REDIS_PREFIX",
        "qsgw",
        "prefix of every Redis key the gateway writes",
    ),
    ("GATEWAY_LISTEN", "127.0.0.1:8000", "address the API binds"),
    (
        "SITE_HOST",
        "http:// + the bound address",
        "public URL of the gateway, injected into jobs as ENV_JOB_GATEWAY_HOST",
    ),
    (
        "GATEWAY_DATA_DIR",
        "./data",
        "data dir (arguments and result files), shared with the Ray node",
    ),
    (
        "RAY_DATA_PATH",
        "GATEWAY_DATA_DIR",
        "the same dir as the Ray node sees it",
    ),
    (
        "SETTINGS_AUTH_MECHANISM",
        "mock_token (embedded), default (Postgres)",
        "mock_token, default (Keycloak) or custom_token",
    ),
    (
        "SETTINGS_AUTH_MOCK_TOKEN",
        "awesome_token",
        "static bearer token of user mockuser (refused off loopback unless DEBUG=1)",
    ),
    (
        "SETTINGS_AUTH_MOCK_TOKENS",
        "unset",
        "more tokens: token1=user1,token2=user2",
    ),
    (
        "GATEWAY_SECRET_KEY",
        "required with Postgres unless DEBUG=1",
        "key that encrypts job tokens and function env vars at rest (also read as DJANGO_SECRET_KEY)",
    ),
    (
        "DJANGO_SECRET_KEY",
        "unset",
        "the original's name for GATEWAY_SECRET_KEY",
    ),
    ("DEBUG", "0", "debug logging and development defaults"),
    ("LOG_FORMAT", "simple", "json for JSON log lines"),
    ("VERSION", "the crate version", "served at /version/"),
    ("LIMITS_JOBS_PER_USER", "2", "PENDING+RUNNING jobs per user"),
    (
        "LIMITS_MAX_CLUSTERS",
        "6",
        "clusters alive at once; in local mode, concurrent jobs on the head",
    ),
    (
        "LIMITS_ACTIVE_JOBS_PER_USER",
        "50",
        "QUEUED+PENDING+RUNNING jobs per user, checked at run (429)",
    ),
    (
        "RAY_CLUSTER_MODE_LOCAL",
        "0",
        "1: one existing Ray head; 0: clusters through KubeRay",
    ),
    (
        "RAY_CLUSTER_MODE_LOCAL_HOST",
        "http://localhost:8265",
        "dashboard URL of the local head (then RAY_LOCAL_HOST, then RAY_HOST)",
    ),
    (
        "RAY_LOCAL_HOST",
        "unset",
        "alias of RAY_CLUSTER_MODE_LOCAL_HOST",
    ),
    (
        "RAY_HOST",
        "unset",
        "lowest-precedence alias of RAY_CLUSTER_MODE_LOCAL_HOST",
    ),
    (
        "RAY_KUBERAY_NAMESPACE",
        "qiskit-serverless",
        "namespace of RayCluster resources",
    ),
    (
        "RAY_NODE_IMAGE",
        "icr.io/quantum-public/qiskit-serverless/ray-node:0.37.0",
        "image of created Ray nodes",
    ),
    (
        "RAY_CLUSTER_MAX_READINESS_TIME",
        "480",
        "seconds a new cluster may take to become ready",
    ),
    (
        "FUNCTIONS_LOGS_SIZE_LIMIT",
        "52428800",
        "bytes of a job's log kept (the tail, with a marker)",
    ),
    (
        "GATEWAY_MAX_ARTIFACT_BYTES",
        "104857600",
        "largest accepted artifact (413 above)",
    ),
    (
        "GATEWAY_MAX_ARGUMENTS_BYTES",
        "1048576",
        "largest accepted arguments (413 above)",
    ),
    (
        "GATEWAY_PYTHON",
        "python3",
        "interpreter of the embedded gateway's local runner",
    ),
    (
        "GATEWAY_WORKER_CONCURRENCY",
        "16",
        "dispatches handled at once per worker process",
    ),
    (
        "GATEWAY_QUEUE_HEARTBEAT_MS",
        "1000",
        "queue heartbeat; a dead worker's task returns after heartbeat x missed heartbeats",
    ),
    (
        "GATEWAY_QUEUE_MISSED_HEARTBEATS",
        "3",
        "missed heartbeats before a worker counts as dead",
    ),
    (
        "GATEWAY_TRACK_INTERVAL_MS",
        "150",
        "how often running jobs are looked at on Ray",
    ),
    (
        "GATEWAY_LEASE_TTL_SECONDS",
        "30",
        "lifetime of a slot lease (renewed by its holder)",
    ),
    (
        "GATEWAY_CLAIM_TTL_SECONDS",
        "5",
        "lifetime of a dispatch claim (renewed during slow steps)",
    ),
    (
        "GATEWAY_RECONCILE_INTERVAL_MS",
        "1000",
        "period of the sweep that re-wakes queued jobs",
    ),
    (
        "GATEWAY_RAY_JOB_RETENTION_SECONDS",
        "600",
        "how long an ended job stays in Ray's job table (its env holds the job's token) before it is deleted there",
    ),
    (
        "GATEWAY_TEST_DISPATCH_PAUSE_MS",
        "0",
        "test hook: a pause inside dispatch; never set in production",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn empty_environment_is_the_embedded_gateway_with_mock_auth() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.backend, Backend::Embedded);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(
            c.limits,
            Limits {
                jobs_per_user: 2,
                max_clusters: 6,
                active_jobs_per_user: 50
            }
        );
        // No token configured: one is generated at start, never the well-known default.
        assert!(matches!(c.auth, AuthMechanism::MockToken { ref tokens } if tokens.is_empty()));
        assert!(c.generate_token);
        assert_eq!(c.runner, RunnerKind::LocalProcess);
        assert!(c.data_dir.is_absolute());
        let c = cfg(&[
            ("RAY_CLUSTER_MODE_LOCAL_HOST", "http://ray:8265"),
            ("SETTINGS_AUTH_MOCK_TOKEN", "t"),
        ])
        .unwrap();
        assert_eq!(c.runner, RunnerKind::Ray);
        assert!(!c.generate_token);
    }

    #[test]
    fn database_without_redis_is_refused() {
        let err = cfg(&[("DATABASE_URL", "postgres://x")]).unwrap_err();
        assert!(err.to_string().contains("REDIS_URL"));
        let err = cfg(&[("REDIS_URL", "redis://x")]).unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"));
    }

    #[test]
    fn database_parts_build_a_url() {
        let c = cfg(&[
            ("DATABASE_HOST", "db"),
            ("DATABASE_PASSWORD", "p@ss"),
            ("REDIS_URL", "redis://r"),
            ("SETTINGS_AUTH_MECHANISM", "mock_token"),
            ("RAY_CLUSTER_MODE_LOCAL", "TRUE"),
            ("DEBUG", "1"),
        ])
        .unwrap();
        assert_eq!(
            c.backend,
            Backend::Distributed {
                database_url: "postgres://serverlessuser:p%40ss@db:5432/serverlessdb".into(),
                redis_url: "redis://r".into()
            }
        );
        assert!(c.ray.local_mode);
    }

    #[test]
    fn distributed_mode_needs_a_secret_key_unless_debug() {
        let base = [
            ("DATABASE_URL", "postgres://x"),
            ("REDIS_URL", "redis://r"),
            ("SETTINGS_AUTH_MECHANISM", "mock_token"),
            ("RAY_CLUSTER_MODE_LOCAL", "1"),
        ];
        assert!(
            cfg(&base)
                .unwrap_err()
                .to_string()
                .contains("GATEWAY_SECRET_KEY")
        );
        let mut with_key = base.to_vec();
        with_key.push(("DJANGO_SECRET_KEY", "k"));
        assert_eq!(cfg(&with_key).unwrap().secret_key.as_deref(), Some("k"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        assert!(
            cfg(&[("RAY_CLUSTER_MODE_LOCAL", "yes")])
                .unwrap_err()
                .to_string()
                .starts_with("RAY_CLUSTER_MODE_LOCAL")
        );
        assert!(
            cfg(&[("LIMITS_JOBS_PER_USER", "-1")])
                .unwrap_err()
                .to_string()
                .starts_with("LIMITS_JOBS_PER_USER")
        );
        assert!(
            cfg(&[("GATEWAY_LISTEN", "nope")])
                .unwrap_err()
                .to_string()
                .starts_with("GATEWAY_LISTEN")
        );
        assert!(cfg(&[("SETTINGS_AUTH_MECHANISM", "magic")]).is_err());
    }

    #[test]
    fn every_variable_read_is_documented_and_every_documented_one_is_read() {
        let source = include_str!("config.rs");
        let code = source
            .split("pub const VARIABLES")
            .next()
            .unwrap_or_default();
        // Whitespace removed, so formatting cannot hide a read.
        let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        let mut read = std::collections::BTreeSet::new();
        for pattern in ["get(\"", "parse_num(&get,\"", "parse_bool_opt(&get,\""] {
            for piece in code.split(pattern).skip(1) {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    read.insert(name);
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            VARIABLES.iter().map(|(n, _, _)| n.to_string()).collect();
        assert_eq!(read, listed);
    }

    #[test]
    fn redacted_urls_hide_credentials() {
        assert_eq!(
            redact_url("postgres://u:p@ss@db:5432/x"),
            "postgres://db:5432/x"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    #[test]
    fn ray_host_precedence() {
        let c = cfg(&[("RAY_HOST", "http://a"), ("RAY_LOCAL_HOST", "http://b/")]).unwrap();
        assert_eq!(c.ray.local_host, "http://b");
        let c = cfg(&[
            ("RAY_HOST", "http://a"),
            ("RAY_CLUSTER_MODE_LOCAL_HOST", "http://c"),
        ])
        .unwrap();
        assert_eq!(c.ray.local_host, "http://c");
    }

    #[test]
    fn mock_tokens_map_several_users_and_the_default_token_needs_loopback() {
        let c = cfg(&[
            ("SETTINGS_AUTH_MOCK_TOKENS", "t1=alice, t2=bob"),
            ("SETTINGS_AUTH_MOCK_TOKEN", "main"),
        ])
        .unwrap();
        let AuthMechanism::MockToken { tokens } = c.auth else {
            panic!("mock auth expected")
        };
        assert_eq!(tokens.get("t1").unwrap(), "alice");
        assert_eq!(tokens.get("t2").unwrap(), "bob");
        assert_eq!(tokens.get("main").unwrap(), "mockuser");
        assert!(!tokens.contains_key("awesome_token"));
        assert!(
            cfg(&[
                ("GATEWAY_LISTEN", "0.0.0.0:8000"),
                ("SETTINGS_AUTH_MOCK_TOKEN", "awesome_token")
            ])
            .is_err()
        );
        assert!(
            cfg(&[
                ("GATEWAY_LISTEN", "0.0.0.0:8000"),
                ("SETTINGS_AUTH_MOCK_TOKEN", "s3cret")
            ])
            .is_ok()
        );
    }
}
