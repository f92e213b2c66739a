//! What the dispatcher, tracker and reconciler of one worker process share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::config::Config;
use shared::limiter::Limiter;
use shared::local_runner::LocalRunner;
use shared::queue::DispatchQueue;
use shared::ray::{RayClient, RayClients, RayError};
use shared::secrets::SecretBox;
use shared::storage::Store;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Ray calls on the hot path are short; a slow head is retried, not waited on.
pub const RAY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct WorkerCtx {
    /// Unique per process (host + ULID): apalis refuses a name it saw alive
    /// recently, and claims in SQL are keyed by it.
    pub name: String,
    pub config: Arc<Config>,
    pub store: Store,
    pub limiter: Limiter,
    pub queue: DispatchQueue,
    pub secrets: SecretBox,
    /// Jobs this process just submitted, handed to its tracker at once.
    pub tracked_tx: mpsc::UnboundedSender<Uuid>,
    /// Runs functions as local processes (embedded gateway without Ray).
    pub local: LocalRunner,
    ray_clients: RayClients,
    /// (Ray head and session, artifact sha256) → uploaded package URI.
    packages: Mutex<HashMap<(String, String), String>>,
}

impl WorkerCtx {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        config: Arc<Config>,
        store: Store,
        limiter: Limiter,
        queue: DispatchQueue,
        secrets: SecretBox,
        tracked_tx: mpsc::UnboundedSender<Uuid>,
    ) -> Self {
        let local = LocalRunner::new(&config.data_dir, &config.python);
        WorkerCtx {
            local,
            name,
            config,
            store,
            limiter,
            queue,
            secrets,
            tracked_tx,
            ray_clients: RayClients::new(RAY_TIMEOUT),
            packages: Mutex::new(HashMap::new()),
        }
    }

    /// The Ray head jobs go to. Local mode has one.
    pub fn ray_host(&self) -> &str {
        &self.config.ray.local_host
    }

    /// The runner that holds jobs submitted to `host`.
    pub fn runner(&self, host: &str) -> Result<crate::runner::Runner, crate::runner::RunError> {
        if crate::runner::Runner::is_local(host) {
            Ok(crate::runner::Runner::Local(self.local.clone()))
        } else {
            Ok(crate::runner::Runner::Ray(self.ray(host)?))
        }
    }

    /// A pooled client per Ray head.
    pub fn ray(&self, host: &str) -> Result<RayClient, RayError> {
        self.ray_clients.get(host)
    }

    pub fn cached_package(&self, host: &str, sha: &str) -> Option<String> {
        self.packages
            .lock()
            .ok()?
            .get(&(host.to_string(), sha.to_string()))
            .cloned()
    }

    pub fn remember_package(&self, host: &str, sha: &str, uri: String) {
        if let Ok(mut p) = self.packages.lock() {
            p.insert((host.to_string(), sha.to_string()), uri);
        }
    }

    pub fn forget_package(&self, host: &str, sha: &str) {
        if let Ok(mut p) = self.packages.lock() {
            p.remove(&(host.to_string(), sha.to_string()));
        }
    }

    /// Pushes wake-ups for the jobs that should run next now that a slot
    /// may be free, fairest first.
    pub async fn wake_next(&self) {
        self.wake_candidates(None, 16).await;
    }

    /// Wakes up to `limit` dispatch candidates (only those last woken
    /// longer than `stale` ago, when given). Returns how many were woken.
    pub async fn wake_candidates(&self, stale: Option<Duration>, limit: i64) -> usize {
        let candidates = match self
            .store
            .dispatch_candidates(self.config.limits.jobs_per_user, stale, limit)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "could not pick the next jobs");
                return 0;
            }
        };
        let ids: Vec<Uuid> = candidates.iter().map(|c| c.job_id).collect();
        if ids.is_empty() {
            return 0;
        }
        match self.queue.push(&ids).await {
            Ok(()) => {
                if let Err(e) = self.store.mark_enqueued(&ids).await {
                    tracing::warn!(error = %e, "could not record wake-ups");
                }
                ids.len()
            }
            Err(e) => {
                tracing::debug!(error = %e, "wake-up push failed; the reconciler retries");
                0
            }
        }
    }
}
