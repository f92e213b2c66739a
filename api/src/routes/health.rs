//! `/liveness/`, `/readiness/` (Postgres and Redis answer), `/version/`.

use std::sync::Arc;
use std::time::Duration;

use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{IntoResponse, Response, handler};
use serde_json::json;

use crate::state::AppState;

#[handler]
pub async fn liveness() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

#[handler]
pub async fn version(state: Data<&Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({ "version": state.config.version }))
}

#[handler]
pub async fn readiness(state: Data<&Arc<AppState>>) -> Response {
    let check = Duration::from_secs(2);
    let db_ok = matches!(
        tokio::time::timeout(check, state.store.ping()).await,
        Ok(Ok(()))
    );
    let redis_ok = match state.redis.clone() {
        Some(mut redis) => matches!(
            tokio::time::timeout(check, redis::cmd("PING").query_async::<String>(&mut redis)).await,
            Ok(Ok(_))
        ),
        None => true,
    };
    match (db_ok, redis_ok) {
        (true, true) => Json(json!({ "status": "ready" })).into_response(),
        (false, _) => Json(json!({ "status": "database_unavailable" }))
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response(),
        (true, false) => Json(json!({ "status": "queue_unavailable" }))
            .with_status(StatusCode::SERVICE_UNAVAILABLE)
            .into_response(),
    }
}
