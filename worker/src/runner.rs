//! Where a submitted job is followed: a Ray head's Jobs API, or the local
//! runner of the embedded gateway. The tracker talks to both the same way;
//! a job's `ray_host` says which ("local" or the dashboard URL).

use shared::local_runner::{LOCAL_HOST, LocalRunError, LocalRunner};
use shared::ray::{RayClient, RayError, RayJobInfo};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Ray(#[from] RayError),
    #[error(transparent)]
    Local(#[from] LocalRunError),
}

pub enum Runner {
    Ray(RayClient),
    Local(LocalRunner),
}

impl Runner {
    pub fn is_local(host: &str) -> bool {
        host == LOCAL_HOST
    }

    pub async fn job(&self, id: Uuid) -> Result<Option<RayJobInfo>, RunError> {
        Ok(match self {
            Runner::Ray(r) => r.job(&id.to_string()).await?,
            Runner::Local(r) => r.job(id).await?,
        })
    }

    pub async fn logs_tail(&self, id: Uuid, max_bytes: usize) -> Result<String, RunError> {
        Ok(match self {
            Runner::Ray(r) => r.logs_tail(&id.to_string(), max_bytes).await?,
            Runner::Local(r) => r.logs_tail(id, max_bytes).await?,
        })
    }

    pub async fn stop(&self, id: Uuid) -> Result<bool, RunError> {
        Ok(match self {
            Runner::Ray(r) => r.stop(&id.to_string()).await?,
            Runner::Local(r) => r.stop(id).await?,
        })
    }
}
