//! `/v1/tokens`: minting and revoking API tokens.
//!
//! Delegation never grows power: a caller can mint a token only with roles
//! it could exercise itself, which means admin in every namespace the token
//! names (and cluster admin to mint cluster admins). The same test decides
//! which tokens a caller may see and revoke. Anyone may revoke the token
//! they are using.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::Caller;
use super::problem::{ApiError, Problem, empty};
use super::{AppState, validate};
use crate::auth::{Claims, Role};
use crate::db::models::TokenRow;
use crate::store::{StoreError, namespaces, tokens as store};

const DEFAULT_TTL: u64 = 24 * 3600;
const MAX_TTL: u64 = 366 * 24 * 3600;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Who the token is for.
    #[schema(min_length = 1, max_length = 255, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$")]
    pub subject: String,
    /// Role per namespace (each must exist).
    #[serde(default)]
    #[schema(schema_with = super::document::roles_schema)]
    pub roles: BTreeMap<String, Role>,
    #[serde(default)]
    pub cluster_admin: bool,
    /// Seconds until expiry, 60 to 31622400 (default one day).
    #[serde(default, deserialize_with = "super::integer::optional")]
    #[schema(minimum = 60, maximum = 31622400)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    #[schema(max_length = 256, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub description: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub jti: String,
    pub subject: String,
    #[schema(schema_with = super::document::roles_schema)]
    pub roles: BTreeMap<String, Role>,
    pub cluster_admin: bool,
    pub description: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
}

/// A new token. `token` is shown this once and stored nowhere.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

fn roles_of(row: &TokenRow) -> BTreeMap<String, Role> {
    serde_json::from_value(row.roles.clone()).unwrap_or_default()
}

fn info(row: TokenRow, revoked: bool) -> TokenInfo {
    TokenInfo {
        roles: roles_of(&row),
        jti: row.jti,
        subject: row.subject,
        cluster_admin: row.cluster_admin,
        description: row.description,
        created_by: row.created_by,
        created_at: row.created_at,
        expires_at: row.expires_at,
        revoked,
    }
}

/// Whether `caller` could have minted this token.
fn manages(caller: &Claims, cluster_admin: bool, roles: &BTreeMap<String, Role>) -> bool {
    caller.cluster_admin
        || (!cluster_admin && !roles.is_empty() && roles.keys().all(|ns| caller.role_in(ns) == Some(Role::Admin)))
}

/// Mints a token (HS256) and records it.
#[utoipa::path(post, operation_id = "tokens_create", path = "/v1/tokens", tag = "tokens", security(("bearer" = [])),
    request_body = CreateToken,
    responses((status = 201, body = NewToken), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 422, body = Problem)))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Json(body): Json<CreateToken>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    validate::text("subject", &body.subject, 1, 255)?;
    validate::text("description", &body.description, 0, 256)?;
    if body.roles.is_empty() && !body.cluster_admin {
        return Err(ApiError::invalid("a token needs at least one namespace role or cluster_admin"));
    }
    let ttl = body.ttl_seconds.unwrap_or(DEFAULT_TTL);
    if !(60..=MAX_TTL).contains(&ttl) {
        return Err(ApiError::invalid(format!("ttl_seconds must be 60 to {MAX_TTL}")));
    }
    if body.cluster_admin {
        caller.require_cluster_admin()?;
    }
    for namespace in body.roles.keys() {
        validate::name("namespace", namespace)?;
        caller.require(namespace, Role::Admin)?;
    }
    let now = Utc::now();
    let claims = Claims {
        sub: body.subject,
        jti: uuid::Uuid::new_v4().to_string(),
        exp: now.timestamp() + ttl as i64,
        iat: Some(now.timestamp()),
        roles: body.roles,
        cluster_admin: body.cluster_admin,
    };
    let row = TokenRow {
        jti: claims.jti.clone(),
        subject: claims.sub.clone(),
        roles: serde_json::to_value(&claims.roles).expect("roles serialise"),
        cluster_admin: claims.cluster_admin,
        description: body.description,
        created_by: caller.0.sub.clone(),
        created_at: now,
        expires_at: Utc.timestamp_opt(claims.exp, 0).single().unwrap_or(now),
    };
    let names: Vec<String> = claims.roles.keys().cloned().collect();
    let stored = row.clone();
    state
        .db
        .run(move |c| {
            // Every namespace must exist: a typo should fail now, not leave
            // a token that silently grants nothing.
            for name in &names {
                namespaces::get(c, name)?;
            }
            store::insert(c, &stored)
        })
        .await?;
    let token = state.keys.mint(&claims);
    Ok((StatusCode::CREATED, Json(NewToken { token, info: info(row, false) })))
}

/// Tokens the caller could have minted, and the caller's own.
#[utoipa::path(get, operation_id = "tokens_list", path = "/v1/tokens", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = TokenList), (status = 401, body = Problem)))]
pub async fn list(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<TokenList>, ApiError> {
    let rows = state.db.run(store::list).await?;
    let tokens = rows
        .into_iter()
        .filter(|(row, _)| row.jti == caller.0.jti || manages(&caller.0, row.cluster_admin, &roles_of(row)))
        .map(|(row, revoked)| info(row, revoked))
        .collect();
    Ok(Json(TokenList { tokens }))
}

/// Revokes a token id. A cluster admin may revoke any id, including one
/// minted by an external RS256 issuer.
#[utoipa::path(delete, operation_id = "tokens_revoke", path = "/v1/tokens/{jti}", tag = "tokens", security(("bearer" = [])),
    params(("jti" = String, Path, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,255}$")),
    responses((status = 204), (status = 404, body = Problem)))]
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(jti): Path<String>,
) -> Result<Response, ApiError> {
    if jti.is_empty() || jti.len() > 255 || jti.chars().any(char::is_control) {
        return Err(ApiError::bad_request("token id must be 1 to 255 characters without control characters"));
    }
    let claims = caller.0.clone();
    state
        .db
        .run(move |c| {
            let own = jti == claims.jti;
            let allowed = own
                || claims.cluster_admin
                || store::get(c, &jti)?.is_some_and(|row| manages(&claims, row.cluster_admin, &roles_of(&row)));
            if !allowed {
                return Err(StoreError::not_found("token", jti));
            }
            store::revoke(c, &jti, &claims.sub)
        })
        .await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
