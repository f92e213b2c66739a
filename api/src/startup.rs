//! Builds the HTTP application; tests reuse it on port 0 with their own
//! database and Redis prefix.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use apalis_redis::ConnectionManager;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::middleware::{NormalizePath, TrailingSlash};
use poem::{Endpoint, EndpointExt, IntoResponse, Route, get};
use poem_openapi::OpenApiService;
use shared::config::{Backend, Config};
use shared::queue::DispatchQueue;
use shared::secrets::SecretBox;
use shared::storage::{PgStore, Store};

use crate::auth::Authenticator;
use crate::error;
use crate::routes::{health, jobs::JobsApi, programs::ProgramsApi};
use crate::state::AppState;

pub fn openapi_service(version: &str) -> OpenApiService<(ProgramsApi, JobsApi), ()> {
    OpenApiService::new(
        (ProgramsApi, JobsApi),
        "Quantum Serverless Gateway",
        version,
    )
    .description(
        "Runs users' Python functions as jobs on Ray; the Qiskit Serverless HTTP contract.",
    )
    .server("/api/v1")
}

/// The committed `openapi/openapi.json` is this document.
pub fn openapi_json() -> String {
    openapi_service(env!("CARGO_PKG_VERSION")).spec()
}

pub struct Application {
    addr: SocketAddr,
    state: Arc<AppState>,
    acceptor: poem::listener::TcpAcceptor,
}

/// What the API runs against, built by the distributed or embedded start.
pub struct Services {
    pub store: Store,
    pub queue: DispatchQueue,
    pub redis: Option<ConnectionManager>,
}

impl Application {
    /// The distributed API: connects to Postgres and Redis and migrates.
    /// The API applies migrations itself; sqlx serialises concurrent
    /// replicas with an advisory lock.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let Backend::Distributed {
            database_url,
            redis_url,
        } = &config.backend
        else {
            anyhow::bail!("no database configured: use the embedded gateway (api::embedded)");
        };
        let store =
            Store::Postgres(PgStore::connect(database_url, 16).await.with_context(|| {
                format!(
                    "connecting to Postgres at {}",
                    shared::config::redact_url(database_url)
                )
            })?);
        store.migrate().await.context("applying migrations")?;
        let redis = apalis_redis::connect(redis_url.as_str())
            .await
            .with_context(|| {
                format!(
                    "connecting to Redis at {}",
                    shared::config::redact_url(redis_url)
                )
            })?;
        let queue = DispatchQueue::new(redis.clone(), &config.redis_prefix, &config.worker);
        Self::build_with(
            config,
            Services {
                store,
                queue,
                redis: Some(redis),
            },
        )
        .await
    }

    /// Binds and assembles the application around ready services.
    pub async fn build_with(config: Config, services: Services) -> anyhow::Result<Self> {
        let acceptor = TcpListener::bind(config.listen.to_string())
            .into_acceptor()
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .context("no local address")?;
        let auth = Authenticator::from_config(&config.auth).map_err(anyhow::Error::msg)?;
        let site_host = config.site_host_or(addr);
        let secrets = SecretBox::from_config(config.secret_key.as_deref());
        services.store.check_secret_key(&secrets).await?;
        let Services {
            store,
            queue,
            redis,
        } = services;
        let state = Arc::new(AppState::new(
            Arc::new(config),
            store,
            queue,
            redis,
            secrets,
            auth,
            site_host,
        ));
        Ok(Application {
            addr,
            state,
            acceptor,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let app = routes(self.state.clone());
        poem::Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(app, shutdown, Some(std::time::Duration::from_secs(10)))
            .await
    }
}

pub fn routes(state: Arc<AppState>) -> impl poem::Endpoint {
    let body_limit = state.config.max_artifact_bytes as usize + 4 * 1024 * 1024;
    let api = openapi_service(&state.config.version);
    let swagger = api.swagger_ui();
    let swagger_too = api.swagger_ui();
    let spec = api.spec_endpoint();
    Route::new()
        // Paths work with and without the trailing slash, as in the original
        // (poem-openapi registers them without it).
        .nest("/api/v1", api.with(NormalizePath::new(TrailingSlash::Trim)))
        .at("/liveness", get(health::liveness))
        .at("/liveness/", get(health::liveness))
        .at("/readiness", get(health::readiness))
        .at("/readiness/", get(health::readiness))
        .at("/version", get(health::version))
        .at("/version/", get(health::version))
        .at("/openapi.json", spec)
        .nest("/docs", swagger)
        .nest("/swagger", swagger_too)
        .around(move |ep, req| async move {
            // Refuse an oversized body before reading it (uploads are capped
            // again, exactly, as they are parsed).
            let declared = req
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
            if declared.is_some_and(|len| len > body_limit) {
                return Err(error::ApiError::PayloadTooLarge(
                    "The request body is too large.".into(),
                )
                .into());
            }
            // Everything logged while serving carries the request and, once
            // authenticated, the user (never the token).
            let span = tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                user = tracing::field::Empty
            );
            tracing::Instrument::instrument(ep.call(req), span)
                .await
                .map(IntoResponse::into_response)
        })
        .data(state)
        .catch_all_error(error::to_json)
}
