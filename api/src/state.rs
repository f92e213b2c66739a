//! What every request handler shares.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apalis_redis::ConnectionManager;
use shared::artifact::ArtifactLimits;
use shared::config::Config;
use shared::local_runner::LocalRunner;
use shared::queue::DispatchQueue;
use shared::secrets::SecretBox;
use shared::storage::{StorageResult, Store, User};
use uuid::Uuid;

use crate::auth::Authenticator;

/// Short enough that a slow Ray never holds a client; the stored data is
/// the fallback.
pub const RAY_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub queue: DispatchQueue,
    /// `None` in the embedded gateway.
    pub redis: Option<ConnectionManager>,
    pub secrets: SecretBox,
    pub auth: Authenticator,
    /// `ENV_JOB_GATEWAY_HOST` and the base of pagination links.
    pub site_host: String,
    pub artifact_limits: ArtifactLimits,
    /// Clients for live logs and stops of running jobs, one per Ray head.
    pub ray: shared::ray::RayClients,
    /// username → id: users are created once and never renamed, so the
    /// cache saves a statement on every request.
    users: RwLock<HashMap<String, Uuid>>,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        store: Store,
        queue: DispatchQueue,
        redis: Option<ConnectionManager>,
        secrets: SecretBox,
        auth: Authenticator,
        site_host: String,
    ) -> Self {
        let artifact_limits = ArtifactLimits {
            max_bytes: config.max_artifact_bytes,
            ..ArtifactLimits::default()
        };
        AppState {
            config,
            store,
            queue,
            redis,
            secrets,
            auth,
            site_host,
            artifact_limits,
            ray: shared::ray::RayClients::new(RAY_CALL_TIMEOUT),
            users: RwLock::new(HashMap::new()),
        }
    }

    /// The embedded gateway's runner, for live logs and stops of local jobs.
    pub fn local_runner(&self) -> LocalRunner {
        LocalRunner::new(&self.config.data_dir, &self.config.python)
    }

    pub async fn user(&self, username: &str) -> StorageResult<User> {
        if let Ok(cache) = self.users.read()
            && let Some(id) = cache.get(username)
        {
            return Ok(User {
                id: *id,
                username: username.to_string(),
            });
        }
        let user = self.store.ensure_user(username).await?;
        if let Ok(mut cache) = self.users.write() {
            cache.insert(user.username.clone(), user.id);
        }
        Ok(user)
    }
}
