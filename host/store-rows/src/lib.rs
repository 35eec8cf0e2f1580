//! The rows both store drivers read: one column list per entity and the decoder that turns a
//! row read with it into the domain type. A driver reads through [`Record`] (its row type,
//! wrapped), so the two drivers decode alike and a corrupt row fails alike: a [`RowError`]
//! naming the table, the column and what was wrong, never a panic and never a silent default.
//!
//! Every list is qualified by its table's alias (`s` sessions, `p` payments, `a` attempts,
//! `e` events, `d` deliveries, `c` collections, `k` idempotency keys, `w` webhook events, `h`
//! account holders, `m` payment methods, `t` holder attempts), so
//! the lists can be joined; decoders take the index of the list's first column in the row.

#![forbid(unsafe_code)]

use payhost_core::domain::{
    AccountHolder, AccountHolderId, Attempt, AttemptId, AttemptState, Capture, CaptureId,
    CollectionId, Currency, HolderAttempt, HolderStatus, MethodStatus, Operation, Payment,
    PaymentCollection, PaymentId, PaymentMethod, PaymentMethodId, PaymentSession, Refund, RefundId,
    SessionId, SessionStatus,
};
use payhost_core::events::{Delivery, DeliveryState, Event, EventType};
use payhost_core::store::{StoreError, StoredKey, WebhookEventRecord};
use serde_json::Value;

/// A row as a driver reads it: typed access by index. A driver's error (a NULL where a value
/// must be, a column of another type) comes back as its text.
pub trait Record {
    /// A text column.
    fn text(&self, i: usize) -> Result<String, String>;
    /// A text column that may be NULL.
    fn opt_text(&self, i: usize) -> Result<Option<String>, String>;
    /// An integer column.
    fn int(&self, i: usize) -> Result<i64, String>;
    /// An integer column that may be NULL.
    fn opt_int(&self, i: usize) -> Result<Option<i64>, String>;
    /// A boolean column (SQLite stores it as 0 or 1).
    fn flag(&self, i: usize) -> Result<bool, String>;
}

/// A row that cannot be decoded: the database holds what payhost never writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// The table read.
    pub table: &'static str,
    /// The column, as named in the table.
    pub column: String,
    /// What was wrong with it.
    pub detail: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unreadable row in {}: column {}: {}",
            self.table, self.column, self.detail
        )
    }
}

impl std::error::Error for RowError {}

impl From<RowError> for StoreError {
    fn from(e: RowError) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }
}

/// The columns of `payment_collections c`.
pub const COLLECTION_COLUMNS: &str =
    "c.id, c.amount, c.currency_code, c.metadata, c.created_at, c.updated_at";
/// The columns of `payment_sessions s`.
pub const SESSION_COLUMNS: &str = "s.id, s.payment_collection_id, s.cart_id, s.cart, s.context, s.provider_id, s.is_selected, s.is_initiated, s.status, s.data, s.idempotency_key, s.amount, s.currency_code, s.payment_authorized_at, s.metadata, s.created_at, s.updated_at, s.version, s.reference, s.account_holder_id";
/// The columns of `payments p` (its captures and refunds are read apart).
pub const PAYMENT_COLUMNS: &str = "p.id, p.payment_session_id, p.payment_collection_id, p.provider_id, p.amount, p.currency_code, p.data, p.captured_at, p.canceled_at, p.created_at, p.updated_at, p.version";
/// The columns of `captures c`.
pub const CAPTURE_COLUMNS: &str = "c.id, c.amount, c.attempt_id, c.created_at";
/// The columns of `refunds r`.
pub const REFUND_COLUMNS: &str = "r.id, r.amount, r.reason, r.attempt_id, r.created_at";
/// The columns of `attempts a` both drivers have (PostgreSQL's owner follows them:
/// [`ATTEMPT_OWNER_COLUMNS`]).
pub const ATTEMPT_COLUMNS: &str = "a.id, a.session_id, a.payment_id, a.provider_id, a.operation, a.amount, a.currency_code, a.idempotency_key, a.state, a.outcome, a.error, a.reason, a.checks, a.next_check_at, a.resolution, a.created_at, a.updated_at, a.call_deadline_at, a.requested_by, a.resends";
/// The host that owns an attempt's call and its lease epoch (PostgreSQL only), read after
/// [`ATTEMPT_COLUMNS`].
pub const ATTEMPT_OWNER_COLUMNS: &str = "a.owner_host, a.owner_epoch";
/// The columns of `events e`.
pub const EVENT_COLUMNS: &str = "e.seq, e.id, e.type, e.collection_id, e.session_id, e.payment_id, e.attempt_id, e.amount, e.currency_code, e.created_at, e.data";
/// The columns of `event_deliveries d`, followed in the row by the event's sequence number
/// (SQLite keeps it in the delivery, PostgreSQL in the event).
pub const DELIVERY_COLUMNS: &str = "d.id, d.endpoint_id, d.state, d.attempts, d.next_at, d.first_tried_at, d.last_error, d.delivered_at, d.redelivered_by, d.redelivered_at";
/// The columns of `idempotency_keys k`.
pub const KEY_COLUMNS: &str = "k.operation, k.request_hash, k.response, k.attempt_id";
/// The columns of `webhook_events w`.
pub const WEBHOOK_EVENT_COLUMNS: &str =
    "w.provider_id, w.event_id, w.body, w.session_id, w.action, w.received_at, w.applied_at";

/// The columns of `account_holders h`.
pub const HOLDER_COLUMNS: &str = "h.id, h.provider_id, h.customer_id, h.customer, h.reference, h.data, h.status, h.idempotency_key, h.created_at, h.updated_at, h.version";
/// The columns of `payment_methods m`.
pub const METHOD_COLUMNS: &str = "m.id, m.account_holder_id, m.provider_id, m.reference, m.data, m.status, m.created_at, m.updated_at, m.version";
/// The columns of `holder_attempts t`.
pub const HOLDER_ATTEMPT_COLUMNS: &str = "t.id, t.account_holder_id, t.payment_method_id, t.provider_id, t.operation, t.idempotency_key, t.state, t.detail, t.outcome, t.error, t.checks, t.next_check_at, t.call_deadline_at, t.created_at, t.updated_at, t.version";

/// Reads one row of `table` whose columns, from index `at`, are `columns`.
struct Reader<'r, R: Record + ?Sized> {
    row: &'r R,
    table: &'static str,
    columns: &'static str,
    at: usize,
}

impl<R: Record + ?Sized> Reader<'_, R> {
    fn fail(&self, i: usize, detail: impl Into<String>) -> RowError {
        let column = self
            .columns
            .split(", ")
            .nth(i)
            .map_or_else(|| format!("#{}", self.at + i), |c| c.trim().to_owned());
        let column = column
            .split_once('.')
            .map_or(column.clone(), |(_, c)| c.to_owned());
        RowError {
            table: self.table,
            column,
            detail: detail.into(),
        }
    }

    fn text(&self, i: usize) -> Result<String, RowError> {
        self.row.text(self.at + i).map_err(|e| self.fail(i, e))
    }

    fn opt_text(&self, i: usize) -> Result<Option<String>, RowError> {
        self.row.opt_text(self.at + i).map_err(|e| self.fail(i, e))
    }

    fn int(&self, i: usize) -> Result<i64, RowError> {
        self.row.int(self.at + i).map_err(|e| self.fail(i, e))
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>, RowError> {
        self.row.opt_int(self.at + i).map_err(|e| self.fail(i, e))
    }

    fn flag(&self, i: usize) -> Result<bool, RowError> {
        self.row.flag(self.at + i).map_err(|e| self.fail(i, e))
    }

    fn json(&self, i: usize) -> Result<Value, RowError> {
        let text = self.text(i)?;
        serde_json::from_str(&text).map_err(|e| self.fail(i, format!("not JSON: {e}")))
    }

    fn opt_json(&self, i: usize) -> Result<Option<Value>, RowError> {
        self.opt_text(i)?
            .map(|text| {
                serde_json::from_str(&text).map_err(|e| self.fail(i, format!("not JSON: {e}")))
            })
            .transpose()
    }

    fn currency(&self, i: usize) -> Result<Currency, RowError> {
        let code = self.text(i)?;
        Currency::parse(&code).ok_or_else(|| self.fail(i, format!("unknown currency `{code}`")))
    }

    fn parsed<T>(
        &self,
        i: usize,
        what: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, RowError> {
        let text = self.text(i)?;
        parse(&text).ok_or_else(|| self.fail(i, format!("unknown {what} `{text}`")))
    }
}

/// A collection read with [`COLLECTION_COLUMNS`] from column `at`.
pub fn collection(r: &(impl Record + ?Sized), at: usize) -> Result<PaymentCollection, RowError> {
    let r = Reader {
        row: r,
        table: "payment_collections",
        columns: COLLECTION_COLUMNS,
        at,
    };
    Ok(PaymentCollection {
        id: CollectionId(r.text(0)?),
        amount: r.int(1)?,
        currency_code: r.currency(2)?,
        metadata: r.json(3)?,
        created_at: r.int(4)?,
        updated_at: r.int(5)?,
    })
}

/// A session read with [`SESSION_COLUMNS`] from column `at`.
pub fn session(r: &(impl Record + ?Sized), at: usize) -> Result<PaymentSession, RowError> {
    let r = Reader {
        row: r,
        table: "payment_sessions",
        columns: SESSION_COLUMNS,
        at,
    };
    Ok(PaymentSession {
        id: SessionId(r.text(0)?),
        payment_collection_id: CollectionId(r.text(1)?),
        cart_id: r.opt_text(2)?,
        cart: r.json(3)?,
        context: r.json(4)?,
        provider_id: r.text(5)?,
        is_selected: r.flag(6)?,
        is_initiated: r.flag(7)?,
        status: r.parsed(8, "session status", SessionStatus::parse)?,
        data: r.json(9)?,
        idempotency_key: r.text(10)?,
        amount: r.int(11)?,
        currency_code: r.currency(12)?,
        payment_authorized_at: r.opt_int(13)?,
        metadata: r.json(14)?,
        reference: r.opt_text(18)?,
        account_holder_id: r.opt_text(19)?.map(AccountHolderId),
        created_at: r.int(15)?,
        updated_at: r.int(16)?,
        version: r.int(17)?,
    })
}

/// A payment read with [`PAYMENT_COLUMNS`] from column `at`, without its captures and refunds.
pub fn payment(r: &(impl Record + ?Sized), at: usize) -> Result<Payment, RowError> {
    let r = Reader {
        row: r,
        table: "payments",
        columns: PAYMENT_COLUMNS,
        at,
    };
    Ok(Payment {
        id: PaymentId(r.text(0)?),
        payment_session_id: SessionId(r.text(1)?),
        payment_collection_id: CollectionId(r.text(2)?),
        provider_id: r.text(3)?,
        amount: r.int(4)?,
        currency_code: r.currency(5)?,
        data: r.json(6)?,
        captures: Vec::new(),
        refunds: Vec::new(),
        captured_at: r.opt_int(7)?,
        canceled_at: r.opt_int(8)?,
        created_at: r.int(9)?,
        updated_at: r.int(10)?,
        version: r.int(11)?,
    })
}

/// A capture read with [`CAPTURE_COLUMNS`] from column `at`.
pub fn capture(r: &(impl Record + ?Sized), at: usize) -> Result<Capture, RowError> {
    let r = Reader {
        row: r,
        table: "captures",
        columns: CAPTURE_COLUMNS,
        at,
    };
    Ok(Capture {
        id: CaptureId(r.text(0)?),
        amount: r.int(1)?,
        attempt_id: AttemptId(r.text(2)?),
        created_at: r.int(3)?,
    })
}

/// A refund read with [`REFUND_COLUMNS`] from column `at`.
pub fn refund(r: &(impl Record + ?Sized), at: usize) -> Result<Refund, RowError> {
    let r = Reader {
        row: r,
        table: "refunds",
        columns: REFUND_COLUMNS,
        at,
    };
    Ok(Refund {
        id: RefundId(r.text(0)?),
        amount: r.int(1)?,
        reason: r.opt_text(2)?,
        attempt_id: AttemptId(r.text(3)?),
        created_at: r.int(4)?,
    })
}

/// An attempt read with [`ATTEMPT_COLUMNS`] from column `at` (its owner unset: see
/// [`attempt_owner`]).
pub fn attempt(r: &(impl Record + ?Sized), at: usize) -> Result<Attempt, RowError> {
    let r = Reader {
        row: r,
        table: "attempts",
        columns: ATTEMPT_COLUMNS,
        at,
    };
    let resolution = r
        .opt_text(14)?
        .map(|text| {
            serde_json::from_str(&text).map_err(|e| r.fail(14, format!("not a resolution: {e}")))
        })
        .transpose()?;
    Ok(Attempt {
        id: AttemptId(r.text(0)?),
        session_id: SessionId(r.text(1)?),
        payment_id: r.opt_text(2)?.map(PaymentId),
        provider_id: r.text(3)?,
        operation: r.parsed(4, "operation", Operation::from_wire)?,
        amount: r.int(5)?,
        currency_code: r.currency(6)?,
        idempotency_key: r.text(7)?,
        state: r.parsed(8, "attempt state", AttemptState::parse)?,
        outcome: r.opt_json(9)?,
        error: r.opt_json(10)?,
        reason: r.opt_text(11)?,
        checks: r.int(12)?,
        next_check_at: r.opt_int(13)?,
        resolution,
        created_at: r.int(15)?,
        updated_at: r.int(16)?,
        call_deadline_at: r.opt_int(17)?,
        requested_by: r.opt_text(18)?,
        owner_host: None,
        owner_epoch: None,
        resends: r.int(19)?,
    })
}

/// An account holder read with [`HOLDER_COLUMNS`] from column `at`.
pub fn holder(r: &(impl Record + ?Sized), at: usize) -> Result<AccountHolder, RowError> {
    let r = Reader {
        row: r,
        table: "account_holders",
        columns: HOLDER_COLUMNS,
        at,
    };
    let customer = serde_json::from_value(r.json(3)?)
        .map_err(|e| r.fail(3, format!("not a customer: {e}")))?;
    Ok(AccountHolder {
        id: AccountHolderId(r.text(0)?),
        provider_id: r.text(1)?,
        customer_id: r.text(2)?,
        customer,
        reference: r.opt_text(4)?,
        data: r.json(5)?,
        status: r.parsed(6, "account holder status", HolderStatus::parse)?,
        idempotency_key: r.text(7)?,
        created_at: r.int(8)?,
        updated_at: r.int(9)?,
        version: r.int(10)?,
    })
}

/// A saved payment method read with [`METHOD_COLUMNS`] from column `at`.
pub fn method(r: &(impl Record + ?Sized), at: usize) -> Result<PaymentMethod, RowError> {
    let r = Reader {
        row: r,
        table: "payment_methods",
        columns: METHOD_COLUMNS,
        at,
    };
    Ok(PaymentMethod {
        id: PaymentMethodId(r.text(0)?),
        account_holder_id: AccountHolderId(r.text(1)?),
        provider_id: r.text(2)?,
        reference: r.opt_text(3)?,
        data: r.json(4)?,
        status: r.parsed(5, "payment method status", MethodStatus::parse)?,
        created_at: r.int(6)?,
        updated_at: r.int(7)?,
        version: r.int(8)?,
    })
}

/// A holder attempt read with [`HOLDER_ATTEMPT_COLUMNS`] from column `at`.
pub fn holder_attempt(r: &(impl Record + ?Sized), at: usize) -> Result<HolderAttempt, RowError> {
    let r = Reader {
        row: r,
        table: "holder_attempts",
        columns: HOLDER_ATTEMPT_COLUMNS,
        at,
    };
    Ok(HolderAttempt {
        id: AttemptId(r.text(0)?),
        account_holder_id: AccountHolderId(r.text(1)?),
        payment_method_id: r.opt_text(2)?.map(PaymentMethodId),
        provider_id: r.text(3)?,
        operation: r.parsed(4, "operation", Operation::from_wire)?,
        idempotency_key: r.text(5)?,
        state: r.parsed(6, "attempt state", AttemptState::parse)?,
        detail: r.json(7)?,
        outcome: r.opt_json(8)?,
        error: r.opt_json(9)?,
        checks: r.int(10)?,
        next_check_at: r.opt_int(11)?,
        call_deadline_at: r.int(12)?,
        created_at: r.int(13)?,
        updated_at: r.int(14)?,
        version: r.int(15)?,
    })
}

/// An attempt's owner read with [`ATTEMPT_OWNER_COLUMNS`] from column `at`.
pub fn attempt_owner(
    r: &(impl Record + ?Sized),
    at: usize,
    attempt: &mut Attempt,
) -> Result<(), RowError> {
    let r = Reader {
        row: r,
        table: "attempts",
        columns: ATTEMPT_OWNER_COLUMNS,
        at,
    };
    attempt.owner_host = r.opt_text(0)?;
    attempt.owner_epoch = r.opt_int(1)?;
    Ok(())
}

/// An event read with [`EVENT_COLUMNS`] from column `at`.
pub fn event(r: &(impl Record + ?Sized), at: usize) -> Result<Event, RowError> {
    let r = Reader {
        row: r,
        table: "events",
        columns: EVENT_COLUMNS,
        at,
    };
    Ok(Event {
        seq: r.int(0)?,
        id: r.text(1)?,
        kind: r.parsed(2, "event type", EventType::parse)?,
        payment_collection_id: r.opt_text(3)?,
        payment_session_id: r.opt_text(4)?,
        payment_id: r.opt_text(5)?,
        attempt_id: r.opt_text(6)?,
        amount: r.opt_int(7)?,
        currency_code: r.opt_text(8)?,
        created_at: r.int(9)?,
        data: r.json(10)?,
    })
}

/// A delivery read with [`DELIVERY_COLUMNS`] from column `at`, then its event's sequence
/// number.
pub fn delivery(r: &(impl Record + ?Sized), at: usize) -> Result<Delivery, RowError> {
    let r = Reader {
        row: r,
        table: "event_deliveries",
        columns: DELIVERY_COLUMNS,
        at,
    };
    Ok(Delivery {
        id: r.text(0)?,
        endpoint_id: r.text(1)?,
        state: r.parsed(2, "delivery state", DeliveryState::parse)?,
        attempts: r.int(3)?,
        next_at: r.int(4)?,
        first_tried_at: r.opt_int(5)?,
        last_error: r.opt_text(6)?,
        delivered_at: r.opt_int(7)?,
        redelivered_by: r.opt_text(8)?,
        redelivered_at: r.opt_int(9)?,
        event_seq: r.int(10)?,
    })
}

/// An idempotency key read with [`KEY_COLUMNS`] from column `at`.
pub fn key(r: &(impl Record + ?Sized), at: usize) -> Result<StoredKey, RowError> {
    let r = Reader {
        row: r,
        table: "idempotency_keys",
        columns: KEY_COLUMNS,
        at,
    };
    Ok(StoredKey {
        operation: r.text(0)?,
        request_hash: r.text(1)?,
        response: r.opt_json(2)?,
        attempt_id: r.opt_text(3)?,
    })
}

/// A provider's webhook event read with [`WEBHOOK_EVENT_COLUMNS`] from column `at`.
pub fn webhook_event(
    r: &(impl Record + ?Sized),
    at: usize,
) -> Result<WebhookEventRecord, RowError> {
    let r = Reader {
        row: r,
        table: "webhook_events",
        columns: WEBHOOK_EVENT_COLUMNS,
        at,
    };
    Ok(WebhookEventRecord {
        provider_id: r.text(0)?,
        event_id: r.text(1)?,
        body: r.text(2)?,
        session_id: r.opt_text(3)?,
        action: r.text(4)?,
        received_at: r.int(5)?,
        applied_at: r.opt_int(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::{Record, RowError, SESSION_COLUMNS, session};

    /// A row of text cells; `None` is NULL.
    struct Cells(Vec<Option<&'static str>>);

    impl Record for Cells {
        fn text(&self, i: usize) -> Result<String, String> {
            self.opt_text(i)?.ok_or_else(|| "NULL".to_owned())
        }
        fn opt_text(&self, i: usize) -> Result<Option<String>, String> {
            Ok(self.0.get(i).ok_or("no such column")?.map(str::to_owned))
        }
        fn int(&self, i: usize) -> Result<i64, String> {
            self.text(i)?.parse().map_err(|e| format!("{e}"))
        }
        fn opt_int(&self, i: usize) -> Result<Option<i64>, String> {
            self.opt_text(i)?
                .map(|t| t.parse().map_err(|e| format!("{e}")))
                .transpose()
        }
        fn flag(&self, i: usize) -> Result<bool, String> {
            Ok(self.int(i)? != 0)
        }
    }

    fn session_cells() -> Vec<Option<&'static str>> {
        vec![
            Some("ps_1"),
            Some("pay_col_1"),
            None,
            Some("{}"),
            Some("{}"),
            Some("pp_system_default"),
            Some("0"),
            Some("0"),
            Some("pending"),
            Some("{}"),
            Some("key"),
            Some("1000"),
            Some("eur"),
            None,
            Some("{}"),
            Some("1"),
            Some("1"),
            Some("0"),
            Some("medusa_ps_1"),
            Some("ach_1"),
        ]
    }

    #[test]
    fn a_good_row_decodes() {
        assert_eq!(SESSION_COLUMNS.split(", ").count(), session_cells().len());
        let s = session(&Cells(session_cells()), 0).unwrap();
        assert_eq!((s.id.0.as_str(), s.amount), ("ps_1", 1000));
        assert_eq!(s.reference.as_deref(), Some("medusa_ps_1"));
        assert_eq!(s.account_holder_id.map(|h| h.0).as_deref(), Some("ach_1"));
    }

    /// Whatever is corrupt, the error names the table and the column, and nothing panics.
    #[test]
    fn a_corrupt_row_names_its_table_and_column() {
        let cases: [(usize, Option<&'static str>, &str, &str); 5] = [
            (8, Some("paid"), "status", "unknown session status `paid`"),
            (12, Some("xyz"), "currency_code", "unknown currency `xyz`"),
            (9, Some("{not json"), "data", "not JSON"),
            (11, None, "amount", "NULL"),
            (17, Some("v2"), "version", "invalid digit"),
        ];
        for (i, cell, column, detail) in cases {
            let mut cells = session_cells();
            cells[i] = cell;
            let e: RowError = session(&Cells(cells), 0).unwrap_err();
            assert_eq!((e.table, e.column.as_str()), ("payment_sessions", column));
            assert!(e.detail.contains(detail), "{e}");
            assert!(e.to_string().starts_with(&format!(
                "unreadable row in payment_sessions: column {column}: "
            )));
        }
    }
}
