//! The embedded single-node gateway: no Postgres, no Redis, no Ray needed.
//! State in SQLite under the data dir, an in-process queue and limits, and
//! the local runner (or a Ray head when one is named) — the same API and
//! worker code as the distributed gateway.

use std::path::Path;

use anyhow::Context;
use shared::config::{AuthMechanism, Config, RunnerKind};
use shared::limiter::Limiter;
use shared::queue::DispatchQueue;
use shared::secrets::SecretBox;
use shared::storage::{SqliteStore, Store};

use crate::startup::{Application, Services};

pub struct Embedded {
    /// Held for the life of the process: one embedded gateway per data dir
    /// (a second one would run its own limits and dispatch over the same jobs).
    pub lock: std::fs::File,
    pub app: Application,
    pub worker: worker::Backends,
    pub config: Config,
    /// The token to print: only when it was generated here.
    pub generated_token: Option<String>,
}

/// A secret kept in a file of the data dir, created once (mode 0600).
fn kept_secret(path: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_string();
        if !existing.is_empty() {
            return Ok(existing);
        }
    }
    let mut bytes = [0u8; 24];
    rand::fill(&mut bytes);
    let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, value.as_bytes())?;
    Ok(value)
}

pub async fn start(mut config: Config) -> anyhow::Result<Embedded> {
    let data = config.data_dir.clone();
    std::fs::create_dir_all(&data)
        .with_context(|| format!("creating the data dir {}", data.display()))?;
    let lock_path = data.join("gateway.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another embedded gateway is using the data dir {}; stop it or choose another GATEWAY_DATA_DIR",
            data.display()
        );
    }
    let mut generated_token = None;
    if config.generate_token {
        let token = kept_secret(&data.join("token"))?;
        if let AuthMechanism::MockToken { tokens } = &mut config.auth {
            tokens.insert(token.clone(), "mockuser".into());
        }
        generated_token = Some(token);
    }
    if config.secret_key.is_none() {
        config.secret_key = Some(kept_secret(&data.join("secret_key"))?);
    }
    let sqlite = SqliteStore::connect(&data.join("gateway.db"))
        .await
        .context("opening the SQLite database")?;
    let store = Store::Sqlite(sqlite);
    store.migrate().await.context("applying migrations")?;
    let (queue, rx) = DispatchQueue::local();
    let secrets = SecretBox::from_config(config.secret_key.as_deref());
    let app = Application::build_with(
        config.clone(),
        Services {
            store: store.clone(),
            queue: queue.clone(),
            redis: None,
        },
    )
    .await?;
    let worker = worker::Backends {
        store,
        limiter: Limiter::local(),
        queue,
        feed: worker::Feed::Local(rx),
        secrets,
    };
    Ok(Embedded {
        lock,
        app,
        worker,
        config,
        generated_token,
    })
}

/// The lines a newcomer needs, printed once at start.
pub fn banner(e: &Embedded) -> String {
    let url = format!("http://{}", e.app.addr());
    let token = e
        .generated_token
        .clone()
        .unwrap_or_else(|| "<your SETTINGS_AUTH_MOCK_TOKEN>".into());
    let runner = match e.config.runner {
        RunnerKind::LocalProcess => format!("local processes ({})", e.config.python),
        RunnerKind::Ray => format!("the Ray head at {}", e.config.ray.local_host),
    };
    format!(
        "Quantum serverless gateway (embedded) listening on {url}\n  data:     {}\n  runs on:  {runner}\n  token:    {token}\n\n  from qiskit_serverless import ServerlessClient\n  client = ServerlessClient(host=\"{url}\", token=\"{token}\", channel=\"local\")\n",
        e.config.data_dir.display()
    )
}
