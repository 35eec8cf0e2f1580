//! The schema: numbered migrations (`migrations/NNNN_*.sql`), applied in order in one
//! transaction and recorded in `schema_migrations`.

use payhost_core::store::StoreError;
use rusqlite::{Connection, OptionalExtension, params};

use crate::sql::{exec, unavailable};

/// The schema, one migration per entry, applied in order and recorded in `schema_migrations`.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_schema.sql")),
    (2, include_str!("../migrations/0002_webhook_events.sql")),
    (3, include_str!("../migrations/0003_key_attempts.sql")),
    (4, include_str!("../migrations/0004_call_deadlines.sql")),
    (5, include_str!("../migrations/0005_requested_by.sql")),
    (6, include_str!("../migrations/0006_resends.sql")),
    (7, include_str!("../migrations/0007_key_claims.sql")),
    (8, include_str!("../migrations/0008_outbox.sql")),
    (9, include_str!("../migrations/0009_or_chains.sql")),
    (10, include_str!("../migrations/0010_redelivered_by.sql")),
    (11, include_str!("../migrations/0011_session_reference.sql")),
    (12, include_str!("../migrations/0012_account_holders.sql")),
];

/// Applies the pending migrations in one transaction. Foreign keys are off while it runs (a
/// migration that rebuilds a table drops the one other tables refer to) and checked before it
/// commits.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch("PRAGMA foreign_keys = OFF")
        .map_err(unavailable)?;
    let migrated = migrate_keys_off(conn);
    conn.execute_batch("PRAGMA foreign_keys = ON")
        .map_err(unavailable)?;
    migrated
}

fn migrate_keys_off(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .map_err(unavailable)?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > newest {
        return Err(StoreError::Unavailable(format!(
            "the database schema is version {current}, newer than this payhost ({newest}); upgrade payhost"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Unavailable(format!("migration {version} failed: {e}")))?;
        exec(
            &tx,
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![
                version,
                payhost_core::Clock::now_unix_ms(&payhost_core::SystemClock)
            ],
        )
        .map_err(unavailable)?;
    }
    let broken: Option<(String, Option<i64>)> = tx
        .query_row("PRAGMA foreign_key_check", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(unavailable)?;
    if let Some((table, row)) = broken {
        let row = row.map_or_else(|| "a row".to_owned(), |r| format!("row {r}"));
        return Err(StoreError::Unavailable(format!(
            "after migrating, {row} of {table} refers to a row that does not exist; nothing was changed"
        )));
    }
    tx.commit().map_err(unavailable)
}
