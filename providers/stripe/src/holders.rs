//! Customers and saved payment methods at Stripe (provider-api 1.4): an account holder is a
//! Stripe Customer, a saved method a PaymentMethod attached to it.
//!
//! - Every call that changes something carries payhost's idempotency key as Stripe's, and the
//!   objects payhost makes carry it in `metadata[payhost_key]`, so `retrieve_account_holder` can
//!   tell what became of an unknown create or save by reading Stripe, never by guessing.
//! - A card in the input (tests) becomes a PaymentMethod first; a `payment_method: "pm_…"`
//!   tokenized in the browser is tagged with the key before it is attached. Only the method's id,
//!   brand, last four and expiry are kept.
//! - Deleting a customer detaches its methods first (Stripe does that itself; localstripe does
//!   not), so a later charge with one is refused.

use payhost_provider_api::*;
use serde_json::{Value, json};

use crate::{Reply, StripeProvider};

/// The Stripe customer id of an account holder.
pub(crate) fn customer_id(holder: &AccountHolderRef) -> Result<&str, ProviderError> {
    holder.reference.as_deref().ok_or_else(|| {
        ProviderError::invalid_request("the account holder has no Stripe customer id")
            .param("account_holder.reference")
    })
}

/// What payhost keeps of a Stripe payment method: never the number.
fn kept(pm: &Value) -> Value {
    json!({
        "type": pm["type"],
        "card": {
            "brand": pm["card"]["brand"],
            "last4": pm["card"]["last4"],
            "exp_month": pm["card"]["exp_month"],
            "exp_year": pm["card"]["exp_year"],
        },
    })
}

/// The customer's fields as Stripe's form.
fn customer_form(c: &Customer) -> Vec<(&'static str, String)> {
    let mut form = Vec::new();
    if let Some(email) = &c.email {
        form.push(("email", email.clone()));
    }
    let name = [c.first_name.as_deref(), c.last_name.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    if !name.is_empty() {
        form.push(("name", name));
    } else if let Some(company) = &c.company_name {
        form.push(("name", company.clone()));
    }
    if let Some(phone) = &c.phone {
        form.push(("phone", phone.clone()));
    }
    form
}

impl StripeProvider {
    pub(crate) fn create_customer(
        &self,
        r: CreateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        if r.customer.id.is_empty() {
            return Err(
                ProviderError::invalid_request("a customer needs an id").param("customer.id")
            );
        }
        let mut form = customer_form(&r.customer);
        form.push(("metadata[payhost_key]", r.idempotency_key.clone()));
        form.push((
            "metadata[payhost_account_holder_id]",
            r.account_holder_id.clone(),
        ));
        form.push(("metadata[customer_id]", r.customer.id.clone()));
        let reply = self.request(
            "POST",
            "/v1/customers",
            &form,
            Some(&r.idempotency_key),
            r.deadline_unix_ms,
        )?;
        Ok(Self::answer(reply, made_customer))
    }

    pub(crate) fn update_customer(
        &self,
        r: UpdateAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let id = customer_id(&r.account_holder)?;
        let form = customer_form(&r.customer);
        let reply = self.request(
            "POST",
            &format!("/v1/customers/{id}"),
            &form,
            Some(&r.idempotency_key),
            r.deadline_unix_ms,
        )?;
        Ok(Self::answer(reply, made_customer))
    }

    pub(crate) fn delete_customer(
        &self,
        r: DeleteAccountHolderRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let id = customer_id(&r.account_holder)?;
        let key = &r.idempotency_key;
        let methods = match self.methods_of(id, r.deadline_unix_ms)? {
            Ok(methods) => methods,
            Err(reply) => return Ok(Self::answer(reply, |_| ProviderResponse::processed())),
        };
        for pm in methods {
            let pm = pm["id"].as_str().unwrap_or_default();
            match self.request(
                "POST",
                &format!("/v1/payment_methods/{pm}/detach"),
                &[],
                Some(&format!("{key}:detach:{pm}")),
                r.deadline_unix_ms,
            )? {
                Reply::Ok(_) => {}
                other => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
            }
        }
        let reply = self.request(
            "DELETE",
            &format!("/v1/customers/{id}"),
            &[],
            Some(key),
            r.deadline_unix_ms,
        )?;
        Ok(Self::answer(reply, |_| ProviderResponse::processed()))
    }

    pub(crate) fn retrieve_customer(
        &self,
        r: RetrieveAccountHolderRequest,
    ) -> Result<RetrieveAccountHolderResponse, ProviderError> {
        let deadline = r.deadline_unix_ms;
        let unknown = |reply: Reply| match reply {
            Reply::Outcome(o @ Outcome::Unknown { .. }) => o,
            _ => Outcome::Unknown {
                reason: "Stripe did not answer in full".into(),
            },
        };
        let mut answer = RetrieveAccountHolderResponse {
            status: HolderStatus::NotFound,
            reference: r.account_holder.reference.clone(),
            attempt: None,
            attempt_reference: None,
            data: None,
        };
        // The customer: the one payhost knows, else the one an unknown create made.
        if answer.reference.is_none()
            && let Some(a) = &r.attempt
            && a.operation == Operation::CreateAccountHolder
        {
            match self.find_customer(&a.idempotency_key, deadline)? {
                Ok(Some(customer)) => {
                    answer.reference = customer["id"].as_str().map(str::to_owned);
                    answer.attempt = Some(Outcome::Processed);
                    answer.attempt_reference = answer.reference.clone();
                    answer.data = Some(json!({"customer": customer["id"]}));
                }
                Ok(None) => {
                    answer.attempt = Some(Outcome::NotAttempted {
                        reason: "Stripe has no customer made with this key".into(),
                    })
                }
                Err(reply) => answer.attempt = Some(unknown(reply)),
            }
            return Ok(answer);
        }
        let Some(id) = answer.reference.clone() else {
            answer.attempt = r.attempt.as_ref().map(|_| Outcome::NotAttempted {
                reason: "no Stripe customer was ever made for this account holder".into(),
            });
            return Ok(answer);
        };
        match self.request("GET", &format!("/v1/customers/{id}"), &[], None, deadline) {
            Ok(Reply::Ok(c)) if c["deleted"] == true => answer.status = HolderStatus::Deleted,
            Ok(Reply::Ok(_)) => answer.status = HolderStatus::Active,
            Err(e) if e.kind == ErrorKind::NotFound => answer.status = HolderStatus::NotFound,
            Err(e) => return Err(e),
            Ok(other) => {
                answer.status = HolderStatus::Other;
                answer.attempt = r.attempt.as_ref().map(|_| unknown(other));
                return Ok(answer);
            }
        }
        let Some(a) = &r.attempt else {
            return Ok(answer);
        };
        let gone = matches!(
            answer.status,
            HolderStatus::Deleted | HolderStatus::NotFound
        );
        answer.attempt = Some(match a.operation {
            Operation::CreateAccountHolder => Outcome::Processed,
            Operation::DeleteAccountHolder if gone => Outcome::Processed,
            Operation::DeleteAccountHolder => Outcome::NotAttempted {
                reason: "the Stripe customer still exists".into(),
            },
            Operation::SavePaymentMethod if gone => Outcome::Unknown {
                reason: "the customer is gone, and what was attached to it with it".into(),
            },
            Operation::SavePaymentMethod => match self.methods_of(&id, deadline)? {
                Ok(methods) => match methods
                    .iter()
                    .find(|pm| pm["metadata"]["payhost_key"] == a.idempotency_key.as_str())
                {
                    Some(pm) => {
                        answer.attempt_reference = pm["id"].as_str().map(str::to_owned);
                        answer.data = Some(kept(pm));
                        Outcome::Processed
                    }
                    None => Outcome::NotAttempted {
                        reason: "no payment method saved under this key is attached".into(),
                    },
                },
                Err(reply) => unknown(reply),
            },
            Operation::DeletePaymentMethod => {
                match r
                    .payment_method
                    .as_ref()
                    .and_then(|m| m.reference.as_deref())
                {
                    None => Outcome::Unknown {
                        reason: "which payment method was not said".into(),
                    },
                    Some(pm) => {
                        match self.request(
                            "GET",
                            &format!("/v1/payment_methods/{pm}"),
                            &[],
                            None,
                            deadline,
                        )? {
                            Reply::Ok(pm) if pm["customer"].as_str() == Some(id.as_str()) => {
                                Outcome::NotAttempted {
                                    reason: "the payment method is still attached".into(),
                                }
                            }
                            Reply::Ok(_) => Outcome::Processed,
                            other => unknown(other),
                        }
                    }
                }
            }
            // Stripe keeps no trace of an update; sending it again with its key is harmless.
            _ => Outcome::Unknown {
                reason: "Stripe keeps no record of this call; send it again with its key".into(),
            },
        });
        Ok(answer)
    }

    pub(crate) fn list_methods(
        &self,
        r: ListPaymentMethodsRequest,
    ) -> Result<PaymentMethodList, ProviderError> {
        let id = customer_id(&r.account_holder)?;
        match self.methods_of(id, r.deadline_unix_ms)? {
            Ok(methods) => Ok(PaymentMethodList {
                methods: methods
                    .iter()
                    .filter_map(|pm| {
                        Some(SavedMethod {
                            reference: pm["id"].as_str()?.to_owned(),
                            data: kept(pm),
                        })
                    })
                    .collect(),
            }),
            Err(_) => Err(ProviderError::new(
                ErrorKind::Network,
                "Stripe did not answer the list of payment methods",
            )
            .retryable(true)),
        }
    }

    pub(crate) fn save_method(
        &self,
        r: SavePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        let id = customer_id(&r.account_holder)?;
        let key = &r.idempotency_key;
        let deadline = r.deadline_unix_ms;
        let tag = [
            ("metadata[payhost_key]", key.clone()),
            (
                "metadata[payhost_payment_method_id]",
                r.payment_method_id.clone(),
            ),
        ];
        // The method, tagged with the key so an unknown save can be found.
        let pm = match self.payment_method(&r.input, key, deadline)? {
            Ok(Some(pm)) => pm,
            Ok(None) => {
                return Err(ProviderError::invalid_request(
                    "no payment method: give payment_method (pm_…) or card in the input",
                )
                .param("input.payment_method"));
            }
            Err(other) => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
        };
        match self.request(
            "POST",
            &format!("/v1/payment_methods/{pm}"),
            &tag,
            Some(&format!("{key}:tag")),
            deadline,
        )? {
            Reply::Ok(_) => {}
            other => return Ok(Self::answer(other, |_| ProviderResponse::processed())),
        }
        let reply = self.request(
            "POST",
            &format!("/v1/payment_methods/{pm}/attach"),
            &[("customer", id.to_owned())],
            Some(key),
            deadline,
        )?;
        Ok(Self::answer(reply, |pm| match pm["id"].as_str() {
            Some(pm_id) => ProviderResponse::processed()
                .reference(pm_id)
                .data(kept(&pm)),
            None => ProviderResponse::with_outcome(Outcome::Unknown {
                reason: "Stripe's answer carried no payment method id".into(),
            }),
        }))
    }

    pub(crate) fn delete_method(
        &self,
        r: DeletePaymentMethodRequest,
    ) -> Result<ProviderResponse, ProviderError> {
        customer_id(&r.account_holder)?;
        let pm = r.payment_method.reference.as_deref().ok_or_else(|| {
            ProviderError::invalid_request("the payment method has no Stripe id")
                .param("payment_method.reference")
        })?;
        let reply = self.request(
            "POST",
            &format!("/v1/payment_methods/{pm}/detach"),
            &[],
            Some(&r.idempotency_key),
            r.deadline_unix_ms,
        )?;
        Ok(Self::answer(reply, |_| ProviderResponse::processed()))
    }

    /// Whether `pm` is attached to `customer` now. `Err(reply)`: Stripe did not say.
    pub(crate) fn attached(
        &self,
        customer: &str,
        pm: &str,
        deadline: Option<i64>,
    ) -> Result<Result<bool, Reply>, ProviderError> {
        match self.request(
            "GET",
            &format!("/v1/payment_methods/{pm}"),
            &[],
            None,
            deadline,
        ) {
            Ok(Reply::Ok(found)) => Ok(Ok(found["customer"].as_str() == Some(customer))),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(Ok(false)),
            Err(e) => Err(e),
            Ok(other) => Ok(Err(other)),
        }
    }

    /// Every card attached to the customer (all pages). `Err(reply)`: not read in full.
    fn methods_of(
        &self,
        customer: &str,
        deadline: Option<i64>,
    ) -> Result<Result<Vec<Value>, Reply>, ProviderError> {
        let mut all = Vec::new();
        let walked = self.pages(
            &format!("/v1/payment_methods?customer={customer}&type=card"),
            deadline,
            |pm| {
                all.push(pm.clone());
                false
            },
        )?;
        Ok(walked.map(|_| all))
    }

    /// The customer made under `key`, looking through every page of customers.
    fn find_customer(
        &self,
        key: &str,
        deadline: Option<i64>,
    ) -> Result<Result<Option<Value>, Reply>, ProviderError> {
        let mut found = None;
        let walked = self.pages("/v1/customers", deadline, |c| {
            let made = c["metadata"]["payhost_key"] == key;
            if made {
                found = Some(c.clone());
            }
            made
        })?;
        Ok(walked.map(|_| found))
    }
}

/// A customer Stripe answered with: its id as the reference.
fn made_customer(customer: Value) -> ProviderResponse {
    match customer["id"].as_str() {
        Some(id) => ProviderResponse::processed()
            .reference(id)
            .data(json!({"customer": id})),
        None => ProviderResponse::with_outcome(Outcome::Unknown {
            reason: "Stripe's answer carried no customer id".into(),
        }),
    }
}
