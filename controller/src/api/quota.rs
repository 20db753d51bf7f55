//! `/v1/namespaces/{ns}/quota`: how much a namespace may hold, and how
//! much it holds (see `store::quota` for what counts).
//!
//! Setting a quota is the cluster admin's (it bounds what a tenant takes
//! from the others, so a namespace's own admin must not lift it); reading
//! it is open to anyone with a role in the namespace, so a tenant refused
//! with `quota-exceeded` can see why and how far off it is. Other
//! namespaces are 404, as everywhere.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::extract::Caller;
use super::problem::{ApiError, Problem};
use crate::auth::Role;
use crate::store::quota::{self as store, Limits, Usage};

/// Largest limits taken: far above any real cluster, low enough that sums
/// of them stay in a BIGINT and a typo of a few digits too many is caught.
const MAX_MACHINES: i64 = 1_000_000;
const MAX_VCPUS: i64 = 1 << 24;
/// 1 EiB in MB.
const MAX_MEMORY_MB: i64 = 1 << 40;
/// 1 EiB.
const MAX_SNAPSHOT_BYTES: i64 = 1 << 60;

/// A namespace's limits. Absent or `null`: no limit on that resource.
/// Each limit is at least 1.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    /// Machines that are not destroyed.
    #[serde(default, deserialize_with = "super::integer::optional")]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub machines: Option<i64>,
    /// Their vCPUs, summed.
    #[serde(default, deserialize_with = "super::integer::optional")]
    #[schema(minimum = 1, maximum = 16_777_216)]
    pub vcpus: Option<i64>,
    /// Their guest memory in MB, summed (at most 1 EiB).
    #[serde(default, deserialize_with = "super::integer::optional")]
    #[schema(minimum = 1, maximum = 1099511627776_u64)]
    pub memory_mb: Option<i64>,
    /// Bytes the namespace's snapshots take on their hosts (`disk_bytes`
    /// summed; at most 1 EiB).
    #[serde(default, deserialize_with = "super::integer::optional")]
    #[schema(minimum = 1, maximum = 1152921504606846976_u64)]
    pub snapshot_bytes: Option<i64>,
}

/// What the namespace holds, counted as its limits are.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QuotaUsage {
    pub machines: i64,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub snapshot_bytes: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Quota {
    pub namespace: String,
    pub limits: QuotaLimits,
    pub usage: QuotaUsage,
    /// When the limits were last set; absent if never.
    pub updated_at: Option<DateTime<Utc>>,
}

fn view(namespace: String, quota: store::Quota) -> Quota {
    let Limits { machines, vcpus, memory_mb, snapshot_bytes } = quota.limits;
    let Usage { machines: m, vcpus: v, memory_mb: mem, snapshot_bytes: snap } = quota.usage;
    Quota {
        namespace,
        limits: QuotaLimits { machines, vcpus, memory_mb, snapshot_bytes },
        usage: QuotaUsage { machines: m, vcpus: v, memory_mb: mem, snapshot_bytes: snap },
        updated_at: quota.updated_at,
    }
}

/// Checks each limit given: 1 to its maximum. 0 is refused rather than
/// read as "nothing allowed" or "unlimited", either of which a caller may
/// have meant: `null` is no limit, and a namespace that may hold nothing is
/// better deleted.
fn validate(limits: &QuotaLimits) -> Result<Limits, ApiError> {
    let check = |what: &str, value: Option<i64>, max: i64, unit: &str| match value {
        Some(n) if !(1..=max).contains(&n) => Err(ApiError::invalid(format!(
            "{what} must be 1 to {max}{unit}, or null for no limit; {n} is {}",
            if n < 1 { "too small" } else { "too large" }
        ))),
        _ => Ok(value),
    };
    Ok(Limits {
        machines: check("machines", limits.machines, MAX_MACHINES, "")?,
        vcpus: check("vcpus", limits.vcpus, MAX_VCPUS, "")?,
        memory_mb: check("memory_mb", limits.memory_mb, MAX_MEMORY_MB, " (1 EiB)")?,
        snapshot_bytes: check("snapshot_bytes", limits.snapshot_bytes, MAX_SNAPSHOT_BYTES, " (1 EiB)")?,
    })
}

/// The namespace's limits and usage (any role in it).
#[utoipa::path(get, operation_id = "quota_get", path = "/v1/namespaces/{namespace}/quota", tag = "namespaces",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    responses((status = 200, body = Quota), (status = 404, body = Problem)))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(namespace): Path<String>,
) -> Result<Json<Quota>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    let ns = namespace.clone();
    let quota = state.db.run(move |c| store::get(c, &ns)).await?;
    Ok(Json(view(namespace, quota)))
}

/// Sets the namespace's limits (cluster admin), replacing all of them: a
/// limit left out or `null` is no limit, so `{}` lifts the quota and the
/// same body twice is the same quota. Takes effect for the next create;
/// a limit below current usage stops nothing but refuses creates until
/// usage is back under it. Answers the quota with its usage.
#[utoipa::path(put, operation_id = "quota_set", path = "/v1/namespaces/{namespace}/quota", tag = "namespaces",
    security(("bearer" = [])),
    params(("namespace" = String, Path, pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")),
    request_body = QuotaLimits,
    responses((status = 200, body = Quota), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 422, body = Problem)))]
pub async fn set(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(namespace): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Result<Json<Quota>, ApiError> {
    caller.require(&namespace, Role::Viewer)?;
    caller.require_cluster_admin()?;
    // Read as a value first: serde takes a JSON array for a struct whose
    // fields are all optional (`[]` would lift every limit), and only an
    // object is a quota.
    if !body.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object of limits, e.g. {\"machines\": 10}"));
    }
    let body: QuotaLimits = serde_json::from_value(body)
        .map_err(|e| ApiError::invalid(format!("Failed to deserialize the JSON body into the target type: {e}")))?;
    let limits = validate(&body)?;
    let ns = namespace.clone();
    let quota = state.db.run(move |c| store::set(c, &ns, limits)).await?;
    Ok(Json(view(namespace, quota)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_one_to_their_maximum_or_none() {
        let ok = QuotaLimits { machines: Some(1), vcpus: None, memory_mb: Some(MAX_MEMORY_MB), snapshot_bytes: None };
        assert_eq!(validate(&ok).unwrap().memory_mb, Some(MAX_MEMORY_MB));
        for bad in [
            QuotaLimits { machines: Some(0), ..Default::default() },
            QuotaLimits { vcpus: Some(-1), ..Default::default() },
            QuotaLimits { memory_mb: Some(MAX_MEMORY_MB + 1), ..Default::default() },
            QuotaLimits { snapshot_bytes: Some(i64::MAX), ..Default::default() },
        ] {
            let e = validate(&bad).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
            assert!(e.detail.contains("or null for no limit"), "{}", e.detail);
        }
    }
}
