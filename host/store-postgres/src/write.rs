//! How a write reaches the database. When every op has an encoding, the write is one
//! statement, `SELECT payhost_write(ops)` (migration 8), whose array [`encode_write`] builds: one
//! round trip, its own transaction. Otherwise each op runs its own statement in one
//! transaction ([`apply`]). Each entity module keeps an op's statement and its encoding side by
//! side; this module holds the dispatch, the encoder's [`JsonObject`] and the mapping of
//! `payhost_write`'s refusals.

use payhost_core::store::{HostLease, StoreError, WriteOp};
use serde_json::Value;

use crate::sql::{classify, json};
use crate::{attempts, holders, keys, outbox, payments, sessions, webhooks};

/// The host a write is made as: its lease's host id and epoch (`None` before it registered,
/// as in tools). The database refuses a write of a host whose lease lapsed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Owner {
    pub(crate) host: Option<String>,
    pub(crate) epoch: Option<i64>,
}

impl Owner {
    pub(crate) fn of(lease: Option<&HostLease>) -> Owner {
        Owner {
            host: lease.map(|l| l.host_id.clone()),
            epoch: lease.map(|l| l.epoch),
        }
    }

    /// Whether the write is made under a lease.
    pub(crate) fn leased(&self) -> bool {
        self.host.is_some()
    }

    /// The refusal of a write whose lease lapsed.
    pub(crate) fn fenced(&self, what: &str) -> StoreError {
        StoreError::Fenced(format!(
            "{what}: host {} epoch {}",
            self.host.as_deref().unwrap_or("?"),
            self.epoch.unwrap_or(0)
        ))
    }
}

/// Applies one op with its own statement(s).
pub(crate) async fn apply(
    tx: &deadpool_postgres::Transaction<'_>,
    op: &WriteOp,
    me: &Owner,
) -> Result<(), StoreError> {
    match op {
        WriteOp::InsertCollection(c) => sessions::insert_collection(tx, c).await,
        WriteOp::InsertSession(s) => sessions::insert_session(tx, s).await,
        WriteOp::UpdateSession {
            session,
            expected_version,
        } => sessions::update_session(tx, session, *expected_version).await,
        WriteOp::SelectSession(id) => sessions::select_session(tx, id).await,
        WriteOp::InsertAttempt(a) => attempts::insert(tx, a, me).await,
        WriteOp::UpdateAttempt(a) => attempts::update(tx, a, me).await,
        WriteOp::ExtendDeadline { id, call_ms, .. } => {
            attempts::extend_deadline(tx, id, *call_ms, me).await
        }
        WriteOp::ClaimAttempt {
            id,
            until,
            now,
            stale_before,
        } => attempts::claim(tx, id, *until, *now, *stale_before, me).await,
        WriteOp::InsertPayment(p) => payments::insert(tx, p).await,
        WriteOp::UpdatePayment {
            payment,
            expected_version,
        } => payments::update(tx, payment, *expected_version).await,
        WriteOp::InsertCapture(payment, c) => payments::insert_capture(tx, payment, c).await,
        WriteOp::InsertRefund(payment, r) => payments::insert_refund(tx, payment, r).await,
        WriteOp::ClaimKey {
            key,
            operation,
            request_hash,
            at,
            claim_id,
        } => keys::claim(tx, key, operation, request_hash, *at, claim_id, me).await,
        WriteOp::CompleteKey { key, response } => keys::complete(tx, key, response, me).await,
        WriteOp::ReleaseKey { key, claim_id } => keys::release(tx, key, claim_id).await,
        WriteOp::ForgetKey { key, attempt_id } => keys::forget(tx, key, attempt_id).await,
        WriteOp::LinkKey { key, attempt_id } => keys::link(tx, key, attempt_id, me).await,
        WriteOp::ReleasePendingKeys { older_than } => {
            keys::release_pending(tx, *older_than, me).await
        }
        WriteOp::InsertWebhookEvent(e) => webhooks::insert(tx, e).await,
        WriteOp::InsertAccountHolder(h) => holders::insert_holder(tx, h).await,
        WriteOp::UpdateAccountHolder {
            holder,
            expected_version,
        } => holders::update_holder(tx, holder, *expected_version).await,
        WriteOp::InsertPaymentMethod(m) => holders::insert_method(tx, m).await,
        WriteOp::UpdatePaymentMethod {
            method,
            expected_version,
        } => holders::update_method(tx, method, *expected_version).await,
        WriteOp::InsertHolderAttempt(t) => holders::insert_attempt(tx, t).await,
        WriteOp::UpdateHolderAttempt {
            attempt,
            expected_version,
        } => holders::update_attempt(tx, attempt, *expected_version).await,
        WriteOp::MarkWebhookApplied {
            provider_id,
            event_id,
            at,
        } => webhooks::mark_applied(tx, provider_id, event_id, *at).await,
        WriteOp::AppendEvent { event, deliver_to } => outbox::append(tx, event, deliver_to).await,
        WriteOp::DeliveryOutcomes {
            claimer,
            delivered,
            failed,
            released,
        } => outbox::delivery_outcomes(tx, claimer, delivered, failed, released).await,
        WriteOp::Redeliver { id, endpoints, by } => {
            outbox::redeliver(tx, id.as_deref(), endpoints, by).await
        }
        WriteOp::ParkUnconfigured { configured } => outbox::park_unconfigured(tx, configured).await,
        WriteOp::PruneEvents { before } => outbox::prune(tx, *before).await,
    }
}

/// Appends `op` as an element of `payhost_write`'s array to `out`, or says it has no encoding
/// (`false`: the write takes the statement-per-op path).
fn encode(op: &WriteOp, out: &mut Vec<u8>) -> bool {
    match op {
        WriteOp::InsertCollection(c) => sessions::encode_insert_collection(c, out),
        WriteOp::InsertSession(s) => sessions::encode_insert_session(s, out),
        WriteOp::UpdateSession {
            session,
            expected_version,
        } => sessions::encode_update_session(session, *expected_version, out),
        WriteOp::InsertAttempt(a) => attempts::encode_insert(a, out),
        WriteOp::UpdateAttempt(a) => attempts::encode_update(a, out),
        WriteOp::InsertPayment(p) => payments::encode_insert(p, out),
        WriteOp::UpdatePayment {
            payment,
            expected_version,
        } => payments::encode_update(payment, *expected_version, out),
        WriteOp::InsertCapture(payment, c) => payments::encode_insert_capture(payment, c, out),
        WriteOp::InsertRefund(payment, r) => payments::encode_insert_refund(payment, r, out),
        WriteOp::ClaimKey {
            key,
            operation,
            request_hash,
            at,
            claim_id,
        } => keys::encode_claim(key, operation, request_hash, *at, claim_id, out),
        WriteOp::CompleteKey { key, response } => keys::encode_complete(key, response, out),
        WriteOp::ReleaseKey { key, claim_id } => keys::encode_release(key, claim_id, out),
        WriteOp::ForgetKey { key, attempt_id } => keys::encode_forget(key, attempt_id, out),
        WriteOp::LinkKey { key, attempt_id } => keys::encode_link(key, attempt_id, out),
        WriteOp::InsertWebhookEvent(e) => webhooks::encode_insert(e, out),
        WriteOp::MarkWebhookApplied {
            provider_id,
            event_id,
            at,
        } => webhooks::encode_mark_applied(provider_id, event_id, *at, out),
        WriteOp::AppendEvent { event, deliver_to } => outbox::encode_append(event, deliver_to, out),
        WriteOp::SelectSession(_)
        | WriteOp::ExtendDeadline { .. }
        | WriteOp::ClaimAttempt { .. }
        | WriteOp::ReleasePendingKeys { .. }
        | WriteOp::DeliveryOutcomes { .. }
        | WriteOp::Redeliver { .. }
        | WriteOp::ParkUnconfigured { .. }
        | WriteOp::PruneEvents { .. }
        | WriteOp::InsertAccountHolder(_)
        | WriteOp::UpdateAccountHolder { .. }
        | WriteOp::InsertPaymentMethod(_)
        | WriteOp::UpdatePaymentMethod { .. }
        | WriteOp::InsertHolderAttempt(_)
        | WriteOp::UpdateHolderAttempt { .. } => return false,
    }
    true
}

/// The `payhost_write` array of `ops`, if every op has an encoding.
pub(crate) fn encode_write(ops: &[WriteOp]) -> Option<String> {
    let mut out = Vec::with_capacity(512 * ops.len());
    out.push(b'[');
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if !encode(op, &mut out) {
            return None;
        }
    }
    out.push(b']');
    // Only UTF-8 went in.
    String::from_utf8(out).ok()
}

/// A refusal of `payhost_write` as the store error the per-op path gives for it.
pub(crate) fn classify_write(
    e: tokio_postgres::Error,
    ops: &[WriteOp],
    me: Option<&HostLease>,
) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let message = db.message().to_owned();
        match db.code().code() {
            "PH001" => return StoreError::VersionConflict(message),
            "PH002" => return Owner::of(me).fenced(&message),
            "PH003" => return StoreError::KeyExists(message),
            _ => {}
        }
        // What the per-op path would have named: the op the refusing constraint guards.
        let what = match db.constraint() {
            Some("attempts_one_open") => ops.iter().find_map(|op| match op {
                WriteOp::InsertAttempt(a) => Some(a.entity()),
                _ => None,
            }),
            Some("webhook_events_pkey") => ops.iter().find_map(|op| match op {
                WriteOp::InsertWebhookEvent(w) => Some(format!("{}/{}", w.provider_id, w.event_id)),
                _ => None,
            }),
            _ => None,
        };
        let what = what.unwrap_or_else(|| describe(ops));
        return classify(e, &what);
    }
    classify(e, &describe(ops))
}

/// What a write is about, for an error: the id (or key) of its first op.
pub(crate) fn describe(ops: &[WriteOp]) -> String {
    ops.first()
        .and_then(|op| encode_write(std::slice::from_ref(op)))
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|v| {
            let first = &v[0];
            first
                .get("id")
                .or_else(|| first.get("key"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "the write".into())
}

/// Writes one element of `payhost_write`'s array, field by field, into a buffer (no `Value`
/// tree in between: this runs for every write).
pub(crate) struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> JsonObject<'a> {
    /// Starts the object of the op `op`.
    pub(crate) fn new(out: &'a mut Vec<u8>, op: &str) -> JsonObject<'a> {
        out.extend_from_slice(b"{\"op\":");
        let mut o = JsonObject { out };
        o.string(op);
        o
    }

    fn string(&mut self, v: &str) {
        // A str always serializes.
        let _ = serde_json::to_writer(&mut *self.out, v);
    }

    fn key(&mut self, k: &str) {
        self.out.push(b',');
        self.string(k);
        self.out.push(b':');
    }

    pub(crate) fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        self.string(v);
        self
    }

    pub(crate) fn opt_str(&mut self, k: &str, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.str(k, v),
            None => {
                self.key(k);
                self.out.extend_from_slice(b"null");
                self
            }
        }
    }

    pub(crate) fn int(&mut self, k: &str, v: i64) -> &mut Self {
        self.key(k);
        self.out.extend_from_slice(v.to_string().as_bytes());
        self
    }

    pub(crate) fn opt_int(&mut self, k: &str, v: Option<i64>) -> &mut Self {
        match v {
            Some(v) => self.int(k, v),
            None => self.opt_str(k, None),
        }
    }

    pub(crate) fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k);
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        self
    }

    /// A JSON value stored as text (the columns hold JSON text).
    pub(crate) fn json_text(&mut self, k: &str, v: &Value) -> &mut Self {
        self.str(k, &json(v))
    }

    pub(crate) fn opt_json_text(&mut self, k: &str, v: Option<&Value>) -> &mut Self {
        self.opt_str(k, v.map(json).as_deref())
    }

    pub(crate) fn strings(&mut self, k: &str, v: &[String]) -> &mut Self {
        self.key(k);
        let _ = serde_json::to_writer(&mut *self.out, v);
        self
    }

    /// Ends the object.
    pub(crate) fn end(&mut self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use payhost_core::domain::{CollectionId, Currency, PaymentCollection};
    use payhost_core::store::WriteOp;
    use serde_json::Value;

    use super::{describe, encode_write};

    /// The array `payhost_write` reads is JSON, with text columns as strings of JSON text, and
    /// a write with an op it does not apply takes the other path.
    #[test]
    fn writes_are_encoded_for_payhost_write() {
        let c = PaymentCollection {
            id: CollectionId("paycol_1".into()),
            amount: 1500,
            currency_code: Currency::parse("eur").unwrap(),
            metadata: serde_json::json!({"note": "a \"quoted\" ünïcode line\n"}),
            created_at: 1,
            updated_at: 2,
        };
        let text = encode_write(&[
            WriteOp::InsertCollection(c),
            WriteOp::ReleaseKey {
                key: "k".into(),
                claim_id: "c".into(),
            },
        ])
        .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v[0]["op"], "insert_collection");
        assert_eq!(v[0]["amount"], 1500);
        assert_eq!(v[0]["currency_code"], "eur");
        let metadata: Value = serde_json::from_str(v[0]["metadata"].as_str().unwrap()).unwrap();
        assert_eq!(metadata["note"], "a \"quoted\" ünïcode line\n");
        assert_eq!(v[1]["op"], "release_key");
        assert_eq!(
            describe(&[WriteOp::ReleaseKey {
                key: "k".into(),
                claim_id: "c".into()
            }]),
            "k"
        );
        assert!(encode_write(&[WriteOp::PruneEvents { before: 0 }]).is_none());
    }
}
