//! API tokens minted here, and revocations of any token id.

use std::collections::HashSet;

use chrono::Utc;
use diesel::prelude::*;

use super::StoreError;
use crate::db::models::{RevokedRow, TokenRow};
use crate::db::schema::{api_tokens, revoked_tokens};

pub fn insert(conn: &mut PgConnection, row: &TokenRow) -> Result<(), StoreError> {
    diesel::insert_into(api_tokens::table).values(row).execute(conn)?;
    Ok(())
}

/// Every minted token, newest first, with whether it is revoked.
pub fn list(conn: &mut PgConnection) -> Result<Vec<(TokenRow, bool)>, StoreError> {
    let rows: Vec<TokenRow> =
        api_tokens::table.select(TokenRow::as_select()).order(api_tokens::created_at.desc()).load(conn)?;
    let jtis: Vec<&str> = rows.iter().map(|r| r.jti.as_str()).collect();
    let revoked: HashSet<String> = revoked_tokens::table
        .filter(revoked_tokens::jti.eq_any(&jtis))
        .select(revoked_tokens::jti)
        .load(conn)?
        .into_iter()
        .collect();
    Ok(rows
        .into_iter()
        .map(|r| {
            let is_revoked = revoked.contains(&r.jti);
            (r, is_revoked)
        })
        .collect())
}

pub fn get(conn: &mut PgConnection, jti: &str) -> Result<Option<TokenRow>, StoreError> {
    Ok(api_tokens::table.find(jti).select(TokenRow::as_select()).first(conn).optional()?)
}

/// Revokes a token id (idempotent: revoking twice keeps the first record).
pub fn revoke(conn: &mut PgConnection, jti: &str, by: &str) -> Result<(), StoreError> {
    diesel::insert_into(revoked_tokens::table)
        .values(RevokedRow { jti: jti.to_owned(), revoked_by: by.to_owned(), revoked_at: Utc::now() })
        .on_conflict_do_nothing()
        .execute(conn)?;
    Ok(())
}

pub fn is_revoked(conn: &mut PgConnection, jti: &str) -> Result<bool, StoreError> {
    let found: Option<String> = revoked_tokens::table.find(jti).select(revoked_tokens::jti).first(conn).optional()?;
    Ok(found.is_some())
}
