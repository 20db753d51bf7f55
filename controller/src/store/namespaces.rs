//! Namespaces: the unit of tenancy and of RBAC.

use diesel::prelude::*;

use super::{StoreError, is_unique_violation};
use crate::db::models::NamespaceRow;
use crate::db::schema::{machines, namespaces};

pub fn create(conn: &mut PgConnection, name: &str) -> Result<NamespaceRow, StoreError> {
    diesel::insert_into(namespaces::table)
        .values(namespaces::name.eq(name))
        .returning(NamespaceRow::as_returning())
        .get_result(conn)
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("namespace {name:?} already exists"))
            } else {
                e.into()
            }
        })
}

/// All namespaces, or only those named in `only`.
pub fn list(conn: &mut PgConnection, only: Option<&[String]>) -> Result<Vec<NamespaceRow>, StoreError> {
    let mut query = namespaces::table.select(NamespaceRow::as_select()).order(namespaces::name.asc()).into_boxed();
    if let Some(names) = only {
        query = query.filter(namespaces::name.eq_any(names));
    }
    Ok(query.load(conn)?)
}

pub fn get(conn: &mut PgConnection, name: &str) -> Result<NamespaceRow, StoreError> {
    namespaces::table
        .find(name)
        .select(NamespaceRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| StoreError::not_found("namespace", name))
}

/// Deletes a namespace whose machines are all destroyed (their rows go with
/// it). A namespace with live machines is refused rather than emptied: a
/// typo must not destroy a tenant's fleet. So is one with snapshots: their
/// files are on hosts, and only deleting them through their brokers
/// removes those.
pub fn delete(conn: &mut PgConnection, name: &str) -> Result<(), StoreError> {
    conn.transaction(|conn| {
        let row: Option<String> =
            namespaces::table.find(name).select(namespaces::name).for_update().first(conn).optional()?;
        if row.is_none() {
            return Err(StoreError::not_found("namespace", name));
        }
        let live: i64 = machines::table
            .filter(machines::namespace.eq(name))
            .filter(machines::state.ne("destroyed"))
            .count()
            .get_result(conn)?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "namespace {name:?} still has {live} machine(s) that are not destroyed; delete them first"
            )));
        }
        let snapshots = super::snapshots::count(conn, name)?;
        if snapshots > 0 {
            return Err(StoreError::Conflict(format!(
                "namespace {name:?} still has {snapshots} snapshot(s); delete them first"
            )));
        }
        diesel::delete(namespaces::table.find(name)).execute(conn)?;
        Ok(())
    })
}
