//! The SQLite driver's own tests: private files, no temporary B-tree on any write, and a
//! migration that rebuilds tables keeping every row and rule.

use std::path::Path;

use rusqlite::Connection;

use crate::SqliteStore;
use crate::lock::lock_path;
use crate::migrate::{MIGRATIONS, migrate};
use crate::outbox::INSERT_EVENT;
use crate::sql::connect;

/// The database, its WAL, its shared memory, its lock and the folder made for it are this
/// user's alone; a database left readable by an older version is made private at open.
#[test]
fn the_database_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/payhost.db");
    let store = SqliteStore::open(&db).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("data")), 0o700);
    for file in ["payhost.db", "payhost.db-wal", "payhost.db-shm"] {
        let path = dir.path().join("data").join(file);
        assert!(path.exists(), "{file}");
        assert_eq!(mode(&path), 0o600, "{file}");
    }
    assert_eq!(mode(&lock_path(&db)), 0o600);
    drop(store);
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = SqliteStore::open(&db).unwrap();
    assert_eq!(mode(&db), 0o600, "made private again");
}

fn fresh() -> (tempfile::TempDir, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let conn = connect(&dir.path().join("t.db")).unwrap();
    (dir, conn)
}

/// The opcodes of `sql` and of every trigger program it runs.
fn opcodes(conn: &Connection, sql: &str) -> Vec<String> {
    let mut st = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
    let unbound = vec![rusqlite::types::Null; st.parameter_count()];
    st.query_map(rusqlite::params_from_iter(unbound), |r| {
        r.get::<_, String>(1)
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Every insert and update of every table, with every CHECK, partial index and trigger it
/// runs, is evaluated without building a temporary B-tree (SQLite builds one for `x IN
/// (three or more constants)`, on every statement).
#[test]
fn no_write_builds_a_temporary_table() {
    let (_dir, mut conn) = fresh();
    migrate(&mut conn).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(tables.len() >= 10, "{tables:?}");
    let mut statements = vec![INSERT_EVENT.to_owned()];
    for table in &tables {
        let columns: Vec<(String, bool)> = conn
            .prepare(&format!(
                "SELECT name, pk FROM pragma_table_info('{table}')"
            ))
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? > 0)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let names: Vec<&str> = columns.iter().map(|c| c.0.as_str()).collect();
        statements.push(format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            names.join(", "),
            vec!["?"; names.len()].join(", ")
        ));
        let set: Vec<String> = columns
            .iter()
            .filter(|c| !c.1)
            .map(|c| format!("{} = ?", c.0))
            .collect();
        let key: Vec<String> = columns
            .iter()
            .filter(|c| c.1)
            .map(|c| format!("{} = ?", c.0))
            .collect();
        if !set.is_empty() && !key.is_empty() {
            statements.push(format!(
                "UPDATE {table} SET {} WHERE {}",
                set.join(", "),
                key.join(" AND ")
            ));
        }
    }
    for sql in statements {
        let ops = opcodes(&conn, &sql);
        assert!(ops.len() > 3, "{sql}: {ops:?}");
        assert!(
            !ops.iter().any(|op| op == "OpenEphemeral"),
            "{sql} builds a temporary B-tree: {ops:?}"
        );
    }
}

/// A database written by the schema before migration 9 keeps every row, and every rule,
/// through the rebuild of its tables.
#[test]
fn migration_9_keeps_every_row_and_every_rule() {
    let (_dir, mut conn) = fresh();
    conn.execute_batch(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .unwrap();
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 <= 8) {
        conn.execute_batch(sql).unwrap();
        conn.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
            [version],
        )
        .unwrap();
    }
    conn.execute_batch(
        "INSERT INTO payment_collections VALUES ('pc_1', 2500, 'eur', '{}', 1, 1);
         INSERT INTO payment_sessions VALUES ('ps_1', 'pc_1', 'cart_1', '{}', '{}', 'system', 1, 1, 'authorized', '{\"k\":1}', 'psk_1', 2500, 'eur', 5, '{}', 1, 5, 3);
         INSERT INTO payment_sessions VALUES ('ps_2', 'pc_1', NULL, '{}', '{}', 'system', 0, 0, 'pending', '{}', 'psk_2', 2500, 'eur', NULL, '{}', 2, 2, 1);
         INSERT INTO payments (id, payment_session_id, payment_collection_id, provider_id, amount, currency_code, data, created_at, updated_at, version) VALUES ('pay_1', 'ps_1', 'pc_1', 'system', 2500, 'eur', '{}', 5, 5, 1);
         INSERT INTO attempts (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, outcome, checks, created_at, updated_at, call_deadline_at, requested_by, resends)
             VALUES ('att_1', 'ps_1', 'ps_1', NULL, 'system', 'authorize', 2500, 'eur', 'psk_1:att_1', 'succeeded', '{\"o\":1}', 0, 3, 4, 9, 'key_1', 2);
         INSERT INTO attempts (id, entity_id, session_id, payment_id, provider_id, operation, amount, currency_code, idempotency_key, state, checks, created_at, updated_at)
             VALUES ('att_2', 'pay_1', 'ps_1', 'pay_1', 'system', 'capture', 2500, 'eur', 'psk_1:att_2', 'unknown', 4, 6, 7);
         INSERT INTO events (id, type, created_at, data) VALUES ('evt_1', 'payment.authorized', 5, '{}');
         INSERT INTO event_deliveries (id, endpoint_id, event_seq, order_key, state, attempts, next_at, created_at, last_error) VALUES ('evt_1:erp', 'erp', 1, 'ps_1', 'parked', 7, 9, 5, 'HTTP 500');",
    )
    .unwrap();
    let columns = |conn: &Connection, table: &str| -> Vec<String> {
        conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    // Every column the tables had at version 8, value for value (later migrations may add
    // columns of their own).
    let dump = |conn: &Connection, table: &str, cols: &[String]| -> Vec<String> {
        conn.prepare(&format!(
            "SELECT json_array({}) FROM {table} ORDER BY 1",
            cols.join(", ")
        ))
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    let tables = [
        "payment_sessions",
        "attempts",
        "event_deliveries",
        "payments",
    ];
    let cols: Vec<Vec<String>> = tables.iter().map(|t| columns(&conn, t)).collect();
    let before: Vec<Vec<String>> = tables
        .iter()
        .zip(&cols)
        .map(|(t, c)| dump(&conn, t, c))
        .collect();
    migrate(&mut conn).unwrap();
    let after: Vec<Vec<String>> = tables
        .iter()
        .zip(&cols)
        .map(|(t, c)| dump(&conn, t, c))
        .collect();
    assert_eq!(before, after);
    assert_eq!(before[1].len(), 2);
    let version: i64 = conn
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(version, MIGRATIONS.last().unwrap().0);

    let refused = |sql: &str, says: &str| {
        let e = conn.execute_batch(sql).unwrap_err().to_string();
        assert!(e.contains(says), "{sql}: {e}");
    };
    // The rules the rebuilt tables carry, each still enforced.
    refused(
        "UPDATE payment_sessions SET status = 'bogus' WHERE id = 'ps_2'",
        "CHECK constraint failed",
    );
    refused(
        "UPDATE payment_sessions SET status = 'pending' WHERE id = 'ps_1'",
        "invariant: a terminal session status cannot change",
    );
    refused(
        "INSERT INTO attempts (id, entity_id, session_id, provider_id, operation, amount, currency_code, idempotency_key, state, checks, created_at, updated_at) VALUES ('att_3', 'pay_1', 'ps_1', 'system', 'capture', 1, 'eur', 'k3', 'in_flight', 0, 8, 8)",
        "UNIQUE constraint failed: attempts.entity_id",
    );
    refused(
        "UPDATE attempts SET state = 'bogus' WHERE id = 'att_2'",
        "CHECK constraint failed",
    );
    refused(
        "UPDATE attempts SET state = 'in_flight' WHERE id = 'att_1'",
        "invariant: a settled attempt cannot change",
    );
    refused(
        "DELETE FROM attempts WHERE id = 'att_2'",
        "invariant: attempts are never deleted",
    );
    refused(
        "INSERT INTO attempts (id, entity_id, session_id, provider_id, operation, amount, currency_code, idempotency_key, state, checks, created_at, updated_at) VALUES ('att_4', 'ps_2', 'ps_2', 'system', 'authorize', 1, 'eur', 'psk_1:att_1', 'in_flight', 0, 8, 8)",
        "UNIQUE constraint failed: attempts.idempotency_key",
    );
    refused(
        "UPDATE event_deliveries SET state = 'bogus'",
        "CHECK constraint failed",
    );
    refused(
        "INSERT INTO payment_sessions (id, payment_collection_id, cart_id, cart, context, provider_id, is_selected, is_initiated, status, data, idempotency_key, amount, currency_code, payment_authorized_at, metadata, created_at, updated_at, version) VALUES ('ps_3', 'pc_missing', NULL, '{}', '{}', 'system', 0, 0, 'pending', '{}', 'psk_3', 1, 'eur', NULL, '{}', 1, 1, 1)",
        "FOREIGN KEY constraint failed",
    );
    refused(
        "UPDATE payments SET payment_session_id = 'ps_missing' WHERE id = 'pay_1'",
        "FOREIGN KEY constraint failed",
    );
    // The attempt left open still holds its entity: settling it frees the slot.
    conn.execute_batch(
        "UPDATE attempts SET state = 'succeeded' WHERE id = 'att_2';
         INSERT INTO attempts (id, entity_id, session_id, provider_id, operation, amount, currency_code, idempotency_key, state, checks, created_at, updated_at) VALUES ('att_3', 'pay_1', 'ps_1', 'system', 'capture', 1, 'eur', 'k3', 'in_flight', 0, 8, 8);",
    )
    .unwrap();
    let indexes: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'index' AND name IN ('payment_sessions_cart', 'payment_sessions_collection', 'attempts_one_open', 'attempts_entity', 'event_deliveries_open', 'event_deliveries_event')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 6);
    let leftovers: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name LIKE '%_new%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(leftovers, 0);
}
