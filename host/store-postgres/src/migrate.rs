//! The schema: numbered migrations (`migrations/NNNN_*.sql`), applied in order in one
//! transaction under an advisory lock, so hosts starting together are safe.

use payhost_core::store::StoreError;

use crate::PostgresStore;
use crate::sql::unavailable;

/// Any number, so that every host takes the same lock for migrations.
const MIGRATION_LOCK: i64 = 0x0070_6179_686f_7374; // "payhost"

/// The schema, one migration per entry, applied in order and recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_schema.sql")),
    (2, include_str!("../migrations/0002_webhook_events.sql")),
    (3, include_str!("../migrations/0003_key_attempts.sql")),
    (4, include_str!("../migrations/0004_call_deadlines.sql")),
    (5, include_str!("../migrations/0005_requested_by.sql")),
    (6, include_str!("../migrations/0006_host_leases.sql")),
    (7, include_str!("../migrations/0007_outbox.sql")),
    (8, include_str!("../migrations/0008_payhost_write.sql")),
    (9, include_str!("../migrations/0009_redelivered_by.sql")),
    (10, include_str!("../migrations/0010_session_reference.sql")),
    (11, include_str!("../migrations/0011_account_holders.sql")),
];

impl PostgresStore {
    /// Applies the pending migrations.
    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(unavailable)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(unavailable)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await
        .map_err(unavailable)?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(unavailable)?
            .try_get(0)
            .map_err(unavailable)?;
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > newest {
            return Err(StoreError::Unavailable(format!(
                "the database schema is version {current}, newer than this payhost ({newest}); upgrade payhost"
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| StoreError::Unavailable(format!("migration {version} failed: {e}")))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[
                    version,
                    &payhost_core::Clock::now_unix_ms(&payhost_core::SystemClock),
                ],
            )
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }
}
