import { test } from "node:test"
import assert from "node:assert/strict"
import { PayhostClient } from "../../src/client"
import { PayhostProviderService } from "../../src/service"
import { sign } from "../../src/signature"
import { Scripted, err, fakeFetch } from "./fake"

const SECRET = "whsec_medusa_0123456789abcdef"
const OPTIONS = {
  url: "http://payhost.test",
  api_key: "phk_medusa_secret",
  provider: "sandbox",
  webhook_secret: SECRET,
}

function provider(script: Scripted[], cradle: Record<string, unknown> = {}) {
  const svc = new PayhostProviderService({ logger: { warn() {}, info() {}, error() {} }, ...cradle }, OPTIONS)
  const fake = fakeFetch(script)
  ;(svc as any).client_ = new PayhostClient((svc as any).options_, async () => {}, fake.fetch)
  return { svc, requests: fake.requests }
}

const session = (over: Record<string, unknown> = {}) => ({
  id: "ps_1",
  payment_collection_id: "paycol_1",
  provider_id: "sandbox",
  status: "pending",
  amount: 1999,
  currency_code: "eur",
  data: { card: { last4: "4242", kind: "ok" } },
  reference: "payses_1",
  ...over,
})

const payment = (over: Record<string, unknown> = {}) => ({
  id: "pay_1",
  payment_session_id: "ps_1",
  payment_collection_id: "paycol_1",
  provider_id: "sandbox",
  amount: 1999,
  currency_code: "eur",
  status: "authorized",
  captured_amount: 0,
  refunded_amount: 0,
  captures: [],
  refunds: [],
  ...over,
})

test("initiate: one round trip, namespaced key, reference, card data nulled, ids stored", async () => {
  const { svc, requests } = provider([{ status: 201, body: session() }])
  const out = await svc.initiatePayment({
    amount: 19.99,
    currency_code: "EUR",
    data: { session_id: "payses_1", card_number: "4242424242424242", card: { cvc: "123", brand: "visa" } },
    context: { idempotency_key: "payses_1", customer: { id: "cus_1", email: "a@b.c" } as any },
  })
  const r = requests[0]
  assert.equal(r.url.pathname, "/v1/payment-sessions")
  assert.equal(r.headers["idempotency-key"], "medusa:initiate:payses_1")
  assert.equal(r.body.amount, 1999)
  assert.equal(r.body.currency_code, "eur")
  assert.equal(r.body.reference, "payses_1")
  assert.equal(r.body.payment_collection_id, undefined)
  assert.equal(r.body.provider_id, "sandbox")
  assert.deepEqual(r.body.data, { card_number: "4242424242424242", card: { cvc: "123", brand: "visa" } }, "the card goes to payhost as transient input")
  assert.deepEqual(r.body.context, { customer: { id: "cus_1", email: "a@b.c" } })
  assert.equal(out.id, "ps_1")
  assert.equal(out.status, "pending")
  const d = out.data!
  assert.equal(d.card_number, null)
  assert.deepEqual(d.card, { cvc: null })
  assert.equal(d.session_id, "payses_1")
  assert.equal(d.payhost_session_id, "ps_1")
  assert.equal(d.payhost_collection_id, "paycol_1")
  assert.equal(d.payhost_status, "pending")
  assert.equal(d.payhost_payment_id, null, "stale payment ids from a re-created session are cleared")
  assert.equal(d.payhost_authorize_seq, 0)
})

test("initiate refuses 200.129 USD before calling payhost", async () => {
  const { svc, requests } = provider([])
  await assert.rejects(
    svc.initiatePayment({ amount: 200.129, currency_code: "usd", data: { session_id: "payses_1" } }),
    /200\.129 USD has 3 decimals but USD has 2/
  )
  assert.equal(requests.length, 0)
})

test("authorize: processed -> authorized with the payment's ids", async () => {
  const { svc, requests } = provider([
    { status: 200, body: { payment_session: session({ status: "authorized" }), payment: payment(), next_action: null, decline: null } },
  ])
  const out = await svc.authorizePayment({
    data: { session_id: "payses_1", payhost_session_id: "ps_1", payhost_authorize_seq: 0, payhost_status: "pending" },
    context: { idempotency_key: "payses_1" },
  })
  assert.equal(requests[0].url.pathname, "/v1/payment-sessions/ps_1/authorize")
  assert.equal(requests[0].headers["idempotency-key"], "medusa:authorize:payses_1:0")
  assert.equal(requests[0].body.data, undefined, "the bridge's own keys are not provider input")
  assert.equal(requests[0].body.context, undefined, "no context: the session's stays")
  assert.equal(out.status, "authorized")
  assert.equal(out.data!.payhost_payment_id, "pay_1")
  assert.equal(out.data!.payhost_payment_status, "authorized")
  assert.equal(out.data!.payhost_next_action, null)
})

test("authorize: requires_more stores the next action and bumps the key's sequence; then a new call", async () => {
  const nextAction = { type: "redirect", url: "https://3ds.example/x" }
  const { svc, requests } = provider([
    { status: 200, body: { payment_session: session({ status: "requires_more" }), payment: null, next_action: nextAction } },
    { status: 200, body: { payment_session: session({ status: "authorized" }), payment: payment() } },
  ])
  const first = await svc.authorizePayment({
    data: { session_id: "payses_1", payhost_session_id: "ps_1", payhost_authorize_seq: 0 },
    context: { idempotency_key: "payses_1" },
  })
  assert.equal(first.status, "requires_more")
  assert.deepEqual(first.data!.payhost_next_action, nextAction)
  assert.equal(first.data!.payhost_authorize_seq, 1)
  const stored = { session_id: "payses_1", payhost_session_id: "ps_1", ...first.data }
  const second = await svc.authorizePayment({ data: stored, context: { idempotency_key: "payses_1" } })
  assert.equal(requests[1].headers["idempotency-key"], "medusa:authorize:payses_1:1")
  assert.equal(second.status, "authorized")
  assert.equal(second.data!.payhost_next_action, null, "the stale 3-D Secure action is cleared")
})

test("authorize: pending (asynchronous) -> pending_authorization, sequence bumped", async () => {
  const { svc } = provider([{ status: 200, body: { payment_session: session({ status: "pending" }), payment: null } }])
  const out = await svc.authorizePayment({ data: { payhost_session_id: "ps_1" }, context: { idempotency_key: "payses_1" } })
  assert.equal(out.status, "pending_authorization")
  assert.equal(out.data!.payhost_authorize_seq, 1)
})

test("authorize: 402 declined is returned as error with data, not thrown", async () => {
  const { svc } = provider([{ status: 402, body: err("payment_declined", "declined", "declined (card_declined): Your card was declined") }])
  const out = await svc.authorizePayment({ data: { payhost_session_id: "ps_1", card_number: "4000000000000002" }, context: { idempotency_key: "payses_1" } })
  assert.equal(out.status, "error")
  assert.deepEqual(out.data!.payhost_decline, { code: "card_declined", message: "Your card was declined" })
  assert.equal(out.data!.payhost_status, "error")
  assert.equal(out.data!.card_number, null)
})

test("authorize: 409/504 throw 'outcome unknown, reconciled by payhost'", async () => {
  for (const status of [409, 504]) {
    const { svc } = provider([{ status, body: err("outcome_unknown", "outcome_unknown", "deadline passed") }])
    await assert.rejects(
      svc.authorizePayment({ data: { payhost_session_id: "ps_1" }, context: { idempotency_key: "payses_1" } }),
      /outcome .* is unknown.*payhost will reconcile/
    )
  }
})

test("401/403 throw clearly", async () => {
  const { svc } = provider([{ status: 401, body: err("authentication_error", "key.unknown", "unknown key") }])
  await assert.rejects(svc.retrievePayment({ data: { payhost_session_id: "ps_1" } }), /refused the API key.*api_key/)
  const { svc: svc2 } = provider([{ status: 403, body: err("permission_error", "key.scope", "needs payments") }])
  await assert.rejects(svc2.capturePayment({ data: { payhost_payment_id: "pay_1" } }), /lacks a scope.*--scope payments,read/)
})

test("capture: full capture of what remains, keyed by Medusa's capture id", async () => {
  const { svc, requests } = provider([
    { status: 200, body: payment() },
    { status: 200, body: payment({ status: "captured", captured_amount: 1999 }) },
  ])
  const out = await svc.capturePayment({ data: { payhost_payment_id: "pay_1" }, context: { idempotency_key: "capt_1" } })
  assert.equal(requests[1].url.pathname, "/v1/payments/pay_1/capture")
  assert.deepEqual(requests[1].body, {}, "no amount: payhost captures what remains")
  assert.equal(requests[1].headers["idempotency-key"], "medusa:capture:capt_1")
  assert.equal(out.data!.payhost_payment_status, "captured")
})

test("capture: nothing left to capture (a settled unknown capture) -> captured, no second capture", async () => {
  const { svc, requests } = provider([{ status: 200, body: payment({ status: "captured", captured_amount: 1999 }) }])
  const out = await svc.capturePayment({ data: { payhost_payment_id: "pay_1" }, context: { idempotency_key: "capt_2" } })
  assert.equal(requests.length, 1)
  assert.equal(requests[0].method, "GET")
  assert.equal(out.data!.payhost_captured_amount, 1999)
})

test("capture: a partial capture Medusa recorded is refused, not over-captured", async () => {
  const captureService = { retrieve: async () => ({ id: "capt_1", amount: 5, raw_amount: { value: "5", precision: 20 } }) }
  const { svc, requests } = provider([{ status: 200, body: payment() }], { captureService })
  await assert.rejects(
    svc.capturePayment({ data: { payhost_payment_id: "pay_1" }, context: { idempotency_key: "capt_1" } }),
    /partial captures are not supported.*19\.99 EUR.*instead of 5/
  )
  assert.equal(requests.length, 1)
})

test("refund: Medusa's {value, precision} amount in the stored currency", async () => {
  const { svc, requests } = provider([{ status: 200, body: payment({ status: "partially_refunded", captured_amount: 1999, refunded_amount: 500 }) }])
  await svc.refundPayment({
    amount: { value: "5", precision: 20 } as any,
    data: { payhost_payment_id: "pay_1", payhost_currency_code: "eur" },
    context: { idempotency_key: "ref_1" },
  })
  assert.deepEqual(requests[0].body, { amount: 500 })
  assert.equal(requests[0].headers["idempotency-key"], "medusa:refund:ref_1")
  const { svc: jpy, requests: r2 } = provider([{ status: 200, body: payment({ currency_code: "jpy" }) }])
  await jpy.refundPayment({ amount: 300, data: { payhost_payment_id: "pay_1", payhost_currency_code: "jpy" }, context: { idempotency_key: "ref_2" } })
  assert.deepEqual(r2[0].body, { amount: 300 })
})

test("delete: a declined or canceled session is success; an authorized one is voided", async () => {
  const declined = provider([
    { status: 422, body: err("invalid_state", "invalid_transition", "a session that is error cannot be deleted") },
    { status: 200, body: session({ status: "error" }) },
  ])
  const out = await declined.svc.deletePayment({ data: { payhost_session_id: "ps_1" } })
  assert.equal(out.data!.payhost_status, "error")

  const authorized = provider([
    { status: 422, body: err("invalid_state", "invalid_transition", "a session that is authorized cannot be deleted") },
    { status: 200, body: session({ status: "authorized" }) },
    { status: 200, body: payment({ status: "canceled", canceled_at: 1 }) },
  ])
  const voided = await authorized.svc.deletePayment({ data: { payhost_session_id: "ps_1", payhost_payment_id: "pay_1" } })
  assert.equal(authorized.requests[2].url.pathname, "/v1/payments/pay_1/cancel")
  assert.equal(voided.data!.payhost_payment_status, "canceled")
})

test("delete with only Medusa's session id finds payhost's session by reference", async () => {
  const { svc, requests } = provider([
    { status: 200, body: { payment_sessions: [session()] } },
    { status: 200, body: session({ status: "canceled" }) },
  ])
  await svc.deletePayment({ data: { session_id: "payses_1" } })
  assert.equal(requests[0].url.search, "?reference=payses_1")
  assert.equal(requests[1].method, "DELETE")
  assert.equal(requests[1].url.pathname, "/v1/payment-sessions/ps_1")
})

test("every answer carries data (a missing data would wipe payhost's ids in Medusa)", async () => {
  const { svc } = provider([])
  const out = await svc.deletePayment({ data: {} })
  assert.deepEqual(out, { data: {} })
  const c = await svc.cancelPayment({ data: {} })
  assert.deepEqual(c, { data: {} })
})

function event(type: string, data: Record<string, unknown>, extra: Record<string, unknown> = {}) {
  const body = JSON.stringify({ id: "evt_1", seq: 1, type, data, created_at: Date.now(), ...extra })
  const t = Math.floor(Date.now() / 1000)
  return { data: JSON.parse(body), rawData: Buffer.from(body), headers: { "payhost-signature": sign(SECRET, t, body) } }
}

test("webhook: payment_session.authorized -> authorized with Medusa's session id and major units", async () => {
  const { svc } = provider([])
  const r = await svc.getWebhookActionAndData(
    event("payment_session.authorized", session({ status: "authorized" }), { amount: 1999, currency_code: "eur", payment_session_id: "ps_1" })
  )
  assert.deepEqual(r, { action: "authorized", data: { session_id: "payses_1", amount: 19.99 } })
})

test("webhook: payment.captured -> captured (session reference looked up)", async () => {
  const { svc, requests } = provider([{ status: 200, body: session({ status: "authorized" }) }])
  const r = await svc.getWebhookActionAndData(event("payment.captured", payment({ status: "captured" }), { amount: 1999, currency_code: "eur" }))
  assert.equal(requests[0].url.pathname, "/v1/payment-sessions/ps_1")
  assert.deepEqual(r, { action: "captured", data: { session_id: "payses_1", amount: 19.99 } })
})

test("webhook: other types, other providers, foreign sessions -> not_supported", async () => {
  const { svc } = provider([])
  assert.deepEqual(await svc.getWebhookActionAndData(event("payment.refunded", payment())), { action: "not_supported" })
  assert.deepEqual(await svc.getWebhookActionAndData(event("payment_session.created", session())), { action: "not_supported" })
  assert.deepEqual(
    await svc.getWebhookActionAndData(event("payment_session.authorized", session({ provider_id: "system" }), { amount: 1, currency_code: "eur" })),
    { action: "not_supported" }
  )
  assert.deepEqual(
    await svc.getWebhookActionAndData(event("payment_session.authorized", session({ reference: null }), { amount: 1, currency_code: "eur" })),
    { action: "not_supported" }
  )
})

test("webhook: a bad signature or a parsed-only body is refused", async () => {
  const { svc } = provider([])
  const e = event("payment_session.authorized", session(), { amount: 1999, currency_code: "eur" })
  await assert.rejects(svc.getWebhookActionAndData({ ...e, rawData: Buffer.from(e.rawData.toString().replace("1999", "1")) }), /no payhost-signature v1 matches/)
  await assert.rejects(svc.getWebhookActionAndData({ ...e, rawData: undefined as any }), /raw body is missing/)
  await assert.rejects(svc.getWebhookActionAndData({ ...e, headers: {} }), /header is missing/)
})

test("cancel: Medusa's authorize rollback (no key) does not void a payment Medusa already records", async () => {
  const paymentService = {
    list: async () => [{ id: "pay_medusa_1", data: { payhost_payment_id: "pay_1" }, canceled_at: null }],
  }
  const { svc, requests } = provider([], { paymentService })
  const out = await svc.cancelPayment({ data: { session_id: "payses_1", payhost_payment_id: "pay_1" }, context: {} })
  assert.deepEqual(out, { data: {} })
  assert.equal(requests.length, 0, "no cancel sent")
})

test("cancel: Medusa's authorize rollback with no Medusa Payment voids it; a keyed cancel always does", async () => {
  const paymentService = { list: async () => [] }
  const canceled = { status: 200, body: payment({ status: "canceled", canceled_at: 1 }) }
  const { svc, requests } = provider([canceled, canceled], { paymentService })
  await svc.cancelPayment({ data: { session_id: "payses_1", payhost_payment_id: "pay_1" }, context: {} })
  assert.equal(requests[0].url.pathname, "/v1/payments/pay_1/cancel")
  assert.equal(requests[0].headers["idempotency-key"], "medusa:cancel:pay_1")
  await svc.cancelPayment({ data: { session_id: "payses_1", payhost_payment_id: "pay_1" }, context: { idempotency_key: "pay_medusa_1" } })
  assert.equal(requests[1].headers["idempotency-key"], "medusa:cancel:pay_medusa_1")
})

test("update: amount in minor units, currency change refused, card data nulled", async () => {
  const { svc, requests } = provider([{ status: 200, body: session({ amount: 2500 }) }])
  const out = await svc.updatePayment({
    amount: 25,
    currency_code: "eur",
    data: { payhost_session_id: "ps_1", payhost_currency_code: "eur", card_number: "4242424242424242" },
  })
  assert.deepEqual(requests[0].body, { amount: 2500, data: { card_number: "4242424242424242" } })
  assert.equal(out.data!.card_number, null)
  assert.equal(out.data!.payhost_amount, 2500)
  await assert.rejects(
    svc.updatePayment({ amount: 25, currency_code: "usd", data: { payhost_session_id: "ps_1", payhost_currency_code: "eur" } }),
    /currency cannot change/
  )
})

test("getPaymentStatus and retrievePayment read payhost", async () => {
  const { svc } = provider([
    { status: 200, body: payment({ status: "captured", captured_amount: 1999 }) },
    { status: 200, body: session({ status: "requires_more" }) },
  ])
  assert.equal((await svc.getPaymentStatus({ data: { payhost_payment_id: "pay_1" } })).status, "captured")
  const r = await svc.retrievePayment({ data: { payhost_session_id: "ps_1" } })
  assert.equal(r.data!.payhost_status, "requires_more")
})

test("capture: a racing capture payhost refuses as nothing-left (422) is answered from payhost's books", async () => {
  const { svc, requests } = provider([
    { status: 200, body: payment() },
    { status: 422, body: err("invalid_state", "invalid_transition", "capturing 1999 would exceed the authorized 1999 (1999 already captured)") },
    { status: 200, body: payment({ status: "captured", captured_amount: 1999 }) },
  ])
  const out = await svc.capturePayment({ data: { payhost_payment_id: "pay_1" }, context: { idempotency_key: "capt_9" } })
  assert.equal(requests.length, 3)
  assert.equal(out.data!.payhost_payment_status, "captured")
})
