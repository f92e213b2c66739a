//! Who is calling. `SETTINGS_AUTH_MECHANISM` picks the authenticator; the
//! mock one maps static bearer tokens to users. Keycloak and custom-token
//! verification slot in as further variants of [`Authenticator`].

use std::collections::BTreeMap;
use std::sync::Arc;

use poem::Request;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::ApiKey;
use shared::config::AuthMechanism;
use shared::storage::User;

use crate::error::ApiError;
use crate::state::AppState;

pub enum Authenticator {
    Mock { tokens: BTreeMap<String, String> },
}

impl Authenticator {
    pub fn from_config(mechanism: &AuthMechanism) -> Result<Self, String> {
        match mechanism {
            AuthMechanism::MockToken { tokens } => Ok(Authenticator::Mock {
                tokens: tokens.clone(),
            }),
            other => Err(format!(
                "authentication mechanism {other:?} is not available"
            )),
        }
    }

    /// The user name a token belongs to.
    async fn username(&self, token: &str) -> Option<String> {
        match self {
            Authenticator::Mock { tokens } => tokens.get(token).cloned(),
        }
    }
}

/// An authenticated caller, with what its jobs need to call back.
#[derive(Clone)]
pub struct Caller {
    pub user: User,
    pub token: String,
    pub channel: String,
    pub instance: Option<String>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("user", &self.user.username)
            .finish_non_exhaustive()
    }
}

/// `Authorization: Bearer <token>`. Like the original, the last word of the
/// header is the token, so any scheme word works.
#[derive(SecurityScheme)]
#[oai(
    ty = "api_key",
    key_name = "Authorization",
    key_in = "header",
    checker = "check"
)]
pub struct Auth(pub Caller);

async fn check(req: &Request, key: ApiKey) -> poem::Result<Caller> {
    let state = req
        .data::<Arc<AppState>>()
        .ok_or_else(|| ApiError::Internal("application state missing".into()))?;
    let token = key
        .key
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    if token.is_empty() {
        return Err(ApiError::Unauthorized("Authorization token was not provided.".into()).into());
    }
    let Some(username) = state.auth.username(&token).await else {
        return Err(ApiError::Unauthorized("Invalid token.".into()).into());
    };
    tracing::Span::current().record("user", username.as_str());
    let user = state.user(&username).await.map_err(ApiError::from)?;
    let header = |name: &str| {
        req.header(name)
            .map(str::to_string)
            .filter(|v| !v.is_empty())
    };
    Ok(Caller {
        user,
        token,
        // Mock authentication is the `local` channel whatever the client says.
        channel: "local".into(),
        instance: header("Service-CRN"),
    })
}
