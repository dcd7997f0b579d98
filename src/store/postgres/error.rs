//! PostgreSQL failures as typed store errors, without a row or a password in them.

use std::fmt;

use deadpool_postgres::tokio_postgres::{self, error::SqlState};
use deadpool_postgres::PoolError;

use crate::error::{StoreError, StoreErrorKind};

/// A PostgreSQL failure as the server reported it: its code and message, never its detail
/// (which can quote a row, and so a token).
#[derive(Debug)]
struct ServerError {
    code: String,
    message: String,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for ServerError {}

/// A `tokio-postgres` failure as a typed store error.
pub(super) fn pg(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        // Connection and protocol failures: their text holds no row and no password.
        return StoreError::new(e);
    };
    let code = db.code();
    let kind = if *code == SqlState::UNDEFINED_TABLE || *code == SqlState::INVALID_SCHEMA_NAME {
        StoreErrorKind::NotFound
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE
        || *code == SqlState::INVALID_PASSWORD
        || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        StoreErrorKind::PermissionDenied
    } else if *code == SqlState::DATA_CORRUPTED || *code == SqlState::INDEX_CORRUPTED {
        StoreErrorKind::Corrupt
    } else {
        StoreErrorKind::Backend
    };
    StoreError::with_kind(
        kind,
        ServerError {
            code: code.code().to_owned(),
            message: db.message().to_owned(),
        },
    )
}

/// A failure to get a connection from the pool.
pub(super) fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg(e),
        other => StoreError::new(other.to_string()),
    }
}
