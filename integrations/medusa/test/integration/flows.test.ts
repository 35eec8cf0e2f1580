/**
 * Medusa's real Payment Module (standalone, on a fresh PostgreSQL database) with this provider,
 * against a real `payhost serve` spawned here, with payhost's events delivered to a receiver that
 * does what Medusa's webhook route, subscriber and processPaymentWorkflow do.
 */
import { after, before, describe, test } from "node:test"
import assert from "node:assert/strict"
import { createHmac } from "node:crypto"

import {
  Medusa,
  Payhost,
  Receiver,
  SANDBOX_SECRET,
  bootMedusa,
  createDatabase,
  eventually,
  providerOptions,
  startPayhost,
  startReceiver,
} from "./harness"

const SANDBOX = "pp_payhost_sandbox"
const SYSTEM = "pp_payhost_system"
const OK_CARD = "4242424242424242"

let payhost: Payhost
let receiver: Receiver
let medusa: Medusa
let db: { url: string; drop: () => Promise<void> }

before(async () => {
  db = await createDatabase()
  receiver = await startReceiver()
  payhost = await startPayhost({ webhookUrl: receiver.url })
  medusa = await bootMedusa(db.url, [
    { id: "sandbox", options: providerOptions(payhost, "sandbox") },
    { id: "system", options: providerOptions(payhost, "system") },
  ])
  receiver.setPayment(medusa.payment)
})

after(async () => {
  await medusa?.shutdown().catch(() => undefined)
  await receiver?.close().catch(() => undefined)
  await payhost?.stop().catch(() => undefined)
  await db?.drop().catch(() => undefined)
})

async function checkout(provider: string, amount: number, currency: string, data: Record<string, unknown> = {}) {
  const collection = await medusa.payment.createPaymentCollections({ amount, currency_code: currency })
  const session = await medusa.payment.createPaymentSession(collection.id, {
    provider_id: provider,
    amount,
    currency_code: currency,
    data,
  })
  return { collection, session }
}

async function medusaPayment(paymentId: string) {
  return medusa.payment.retrievePayment(paymentId, { relations: ["captures", "refunds"] })
}

function sum(rows: { amount: unknown }[] | undefined): number {
  return (rows ?? []).reduce((a, r) => a + Number(r.amount), 0)
}

async function payhostPayment(id: string) {
  const r = await payhost.api("GET", `/v1/payments/${id}`)
  assert.equal(r.status, 200, JSON.stringify(r.body))
  return r.body
}

async function payhostSession(id: string) {
  const r = await payhost.api("GET", `/v1/payment-sessions/${id}`)
  assert.equal(r.status, 200, JSON.stringify(r.body))
  return r.body
}

/** Play the processor: the sandbox's signed webhook completing a pending authorization. */
async function sandboxWebhook(sessionId: string, type: string, amount: number, currency: string) {
  const t = Math.floor(Date.now() / 1000)
  const body = JSON.stringify({ id: `evt_sbx_${sessionId}_${type}`, type, session_id: sessionId, amount, currency_code: currency, created: t })
  const sig = createHmac("sha256", SANDBOX_SECRET).update(`${t}.${body}`).digest("hex")
  const r = await fetch(`${payhost.url}/hooks/sandbox`, {
    method: "POST",
    headers: { "content-type": "application/json", "sandbox-signature": `t=${t},v1=${sig}` },
    body,
  })
  assert.equal(r.status, 200, await r.text())
}

describe("medusa-payment-payhost through Medusa's Payment Module", () => {
  test("collection -> session -> authorize -> capture -> refund: both books agree", async () => {
    const { collection, session } = await checkout(SANDBOX, 19.99, "eur", { card_number: OK_CARD, cvc: "123" })
    const d = session.data as Record<string, any>
    assert.match(d.payhost_session_id, /^ps_/)
    assert.match(d.payhost_collection_id, /^paycol_/)
    assert.equal(d.session_id, session.id)
    assert.equal(d.payhost_status, "pending")
    assert.equal(session.status, "pending")
    // Medusa's deep merge keeps a key returned as null, with the value gone.
    assert.equal(d.card_number ?? null, null, "the card number is not stored in Medusa")
    assert.equal(d.cvc ?? null, null, "the CVC is not stored in Medusa")
    assert.ok(!JSON.stringify(d).includes(OK_CARD))
    const ps = await payhostSession(d.payhost_session_id)
    assert.equal(ps.amount, 1999)
    assert.equal(ps.currency_code, "eur")
    assert.equal(ps.reference, session.id)
    assert.ok(!JSON.stringify(ps).includes(OK_CARD), "payhost keeps no card number")

    const payment = await authorize(session.id)
    assert.ok(payment, "authorized")
    const pd = payment.data as Record<string, any>
    assert.match(pd.payhost_payment_id, /^pay_/)
    const stored = await medusa.payment.retrievePaymentSession(session.id)
    assert.equal(stored.status, "authorized")

    await medusa.payment.capturePayment({ payment_id: payment.id })
    await medusa.payment.refundPayment({ payment_id: payment.id, amount: 5 })
    await medusa.payment.refundPayment({ payment_id: payment.id, amount: 2.5 })

    const m = await medusaPayment(payment.id)
    const p = await payhostPayment(pd.payhost_payment_id)
    assert.equal(sum(m.captures), 19.99)
    assert.equal(p.captured_amount, 1999)
    assert.equal(sum(m.refunds), 7.5)
    assert.equal(p.refunded_amount, 750)
    assert.equal(p.status, "partially_refunded")
    const mc = await medusa.payment.retrievePaymentCollection(collection.id)
    assert.equal(Number(mc.captured_amount), 19.99)
    assert.equal(Number(mc.refunded_amount), 7.5)

    // payhost reports the capture as an event; Medusa's webhook flow must not record it twice.
    await receiver.waitFor((ds) => ds.some((x) => x.type === "payment.captured" && x.processed && x.result?.data?.session_id === session.id))
    const again = await medusaPayment(payment.id)
    assert.equal(again.captures!.length, 1, "one capture in Medusa's books")
    assert.equal((await payhostPayment(pd.payhost_payment_id)).captures.length, 1, "one capture at payhost")
    const mine = receiver.deliveries.filter((x) => x.result?.data?.session_id === session.id)
    assert.deepEqual(mine.map((x) => x.result?.action).sort(), ["authorized", "captured"])
    assert.deepEqual(mine.map((x) => x.error), [undefined, undefined], "Medusa's webhook flow ran without errors")
  })

  test("a customer's card saved through Medusa pays a later checkout without card input, and not after its holder is deleted", async () => {
    const customer = { id: "cus_medusa_saved", email: "saved@example.com", first_name: "Ada" }
    const holder = await medusa.payment.createAccountHolder({ provider_id: SANDBOX, context: { customer } } as any)
    const hd = holder.data as Record<string, any>
    assert.match(hd.payhost_account_holder_id, /^ach_/)
    assert.equal(holder.external_id, hd.payhost_account_holder_id)
    const payhostHolder = await payhost.api("GET", `/v1/account-holders/${hd.payhost_account_holder_id}`)
    assert.equal(payhostHolder.status, 200, JSON.stringify(payhostHolder.body))
    assert.equal(payhostHolder.body.customer_id, customer.id)
    assert.equal(payhostHolder.body.status, "active")

    const saved = (await medusa.payment.createPaymentMethods({
      provider_id: SANDBOX,
      context: { account_holder: holder },
      data: { card_number: OK_CARD },
    } as any)) as any
    assert.match(saved.id, /^pm_/)
    assert.ok(!JSON.stringify(saved).includes(OK_CARD), "the card number is not in what Medusa keeps")
    const listed = await medusa.payment.listPaymentMethods({ provider_id: SANDBOX, context: { account_holder: holder } } as any)
    assert.deepEqual(listed.map((m: any) => m.id), [saved.id])
    assert.equal((listed[0] as any).data.payhost_provider_data.card.last4, "4242")

    // Two later checkouts, each with the saved method and no card.
    for (const amount of [12.5, 7]) {
      const collection = await medusa.payment.createPaymentCollections({ amount, currency_code: "eur" })
      const session = await medusa.payment.createPaymentSession(collection.id, {
        provider_id: SANDBOX,
        amount,
        currency_code: "eur",
        data: { payment_method_id: saved.id },
        context: { account_holder: holder, customer },
      } as any)
      const ps = await payhostSession((session.data as any).payhost_session_id)
      assert.equal(ps.account_holder_id, hd.payhost_account_holder_id)
      const payment = await authorize(session.id)
      const pp = await payhostPayment((payment.data as any).payhost_payment_id)
      assert.equal(pp.amount, Math.round(amount * 100))
    }

    // Deleted in Medusa: payhost deletes the customer at the processor, which detaches the card.
    await medusa.payment.deleteAccountHolder(holder.id)
    const gone = await payhost.api("GET", `/v1/account-holders/${hd.payhost_account_holder_id}`)
    assert.equal(gone.body.status, "deleted", JSON.stringify(gone.body))
    assert.deepEqual(gone.body.payment_methods, [])
    const collection = await medusa.payment.createPaymentCollections({ amount: 5, currency_code: "eur" })
    await assert.rejects(
      medusa.payment.createPaymentSession(collection.id, {
        provider_id: SANDBOX,
        amount: 5,
        currency_code: "eur",
        data: { payment_method_id: saved.id },
        context: { account_holder: holder, customer },
      } as any),
      /account holder .* is deleted/
    )
  })

  test("pp_payhost_system: the same flow on payhost's system provider, JPY and KWD amounts", async () => {
    for (const [amount, currency, minor] of [[1500, "jpy", 1500], [12.345, "kwd", 12345]] as const) {
      const { session } = await checkout(SYSTEM, amount, currency)
      const payment = await authorize(session.id)
      await medusa.payment.capturePayment({ payment_id: payment.id })
      const p = await payhostPayment((payment.data as any).payhost_payment_id)
      assert.equal(p.amount, minor)
      assert.equal(p.captured_amount, minor)
      assert.equal(p.provider_id, "system")
    }
  })

  test("an amount with more decimals than its currency is refused, with nothing half-made", async () => {
    const collection = await medusa.payment.createPaymentCollections({ amount: 200.129, currency_code: "usd" })
    await assert.rejects(
      medusa.payment.createPaymentSession(collection.id, { provider_id: SANDBOX, amount: 200.129, currency_code: "usd", data: {} }),
      /200\.129 USD has 3 decimals but USD has 2/
    )
    const sessions = await medusa.payment.listPaymentSessions({ payment_collection_id: collection.id })
    assert.equal(sessions.length, 0, "Medusa deleted its session row")
  })

  test("a decline is stored as error (not thrown by the provider); a new session then succeeds", async () => {
    const { collection, session } = await checkout(SANDBOX, 30, "eur", { card_number: "4000000000000002" })
    await assert.rejects(medusa.payment.authorizePaymentSession(session.id, {}), /was not authorized with the provider/)
    const stored = await medusa.payment.retrievePaymentSession(session.id)
    assert.equal(stored.status, "error")
    const d = stored.data as Record<string, any>
    assert.equal(d.payhost_decline.code, "card_declined")
    assert.equal(d.payhost_status, "error")
    assert.equal((await payhostSession(d.payhost_session_id)).status, "error")

    // Medusa's checkout retry: the create-session workflow deletes the old session first.
    await medusa.payment.deletePaymentSession(session.id)
    const retry = await medusa.payment.createPaymentSession(collection.id, {
      provider_id: SANDBOX,
      amount: 30,
      currency_code: "eur",
      data: { card_number: OK_CARD },
    })
    const payment = await authorize(retry.id)
    assert.ok(payment)
    const mc = await medusa.payment.retrievePaymentCollection(collection.id)
    assert.equal(mc.status, "authorized")
  })

  test("3-D Secure: requires_more, then a NEW payhost authorize completes it", async () => {
    const { session } = await checkout(SANDBOX, 42, "eur", { card_number: "4000002500003155" })
    await assert.rejects(medusa.payment.authorizePaymentSession(session.id, {}), /was not authorized/)
    const first = await medusa.payment.retrievePaymentSession(session.id)
    assert.equal(first.status, "requires_more")
    const d = first.data as Record<string, any>
    assert.ok(d.payhost_next_action, "the 3-D Secure action is stored for the storefront")
    assert.equal(d.payhost_authorize_seq, 1)

    const payment = await authorize(session.id)
    assert.ok(payment, "authorized on the second authorize")
    const after2 = await medusa.payment.retrievePaymentSession(session.id)
    assert.equal(after2.status, "authorized")
    assert.ok(!(after2.data as any).payhost_next_action, "the stale next action is cleared")
    assert.equal((await payhostSession(d.payhost_session_id)).status, "authorized")
  })

  test("asynchronous authorization completed by the processor's webhook reaches Medusa as a payhost event", async () => {
    const { session } = await checkout(SANDBOX, 55.5, "eur", { card_number: "4000000000000051" })
    const none = await medusa.payment.authorizePaymentSession(session.id, {})
    assert.equal(none, null, "pending: Medusa returns no payment")
    const pending = await medusa.payment.retrievePaymentSession(session.id)
    assert.equal(pending.status, "pending_authorization")
    const psId = (pending.data as any).payhost_session_id

    await sandboxWebhook(psId, "payment.authorized", 5550, "eur")
    await receiver.waitFor((ds) =>
      ds.some((x) => x.type === "payment_session.authorized" && x.processed && x.result?.data?.session_id === session.id)
    )
    const delivery = receiver.deliveries.find((x) => x.type === "payment_session.authorized" && x.result?.data?.session_id === session.id)!
    assert.equal(delivery.error, undefined)
    assert.deepEqual(delivery.result, { action: "authorized", data: { session_id: session.id, amount: 55.5 } })
    const authorized = await medusa.payment.retrievePaymentSession(session.id, { relations: ["payment"] })
    assert.equal(authorized.status, "authorized")
    assert.ok(authorized.payment, "Medusa created its Payment from the event")
    assert.match((authorized.payment!.data as any).payhost_payment_id, /^pay_/)
  })

  test("an unknown capture (payhost 504) is reconciled into Medusa's books exactly once", async () => {
    // The sandbox acts on the capture but answers after payhost's 1.5 s deadline: 504, unknown.
    const { session } = await checkout(SANDBOX, 77, "eur", {
      card_number: OK_CARD,
      sandbox: { capture: { outcome: "processed", delay_after_ms: 2500 } },
    })
    const payment = await authorize(session.id)
    const payId = (payment.data as any).payhost_payment_id
    await assert.rejects(
      medusa.payment.capturePayment({ payment_id: payment.id }),
      /outcome .* is unknown.*reconcile/
    )
    let m = await medusaPayment(payment.id)
    assert.equal(m.captures!.length, 0, "Medusa dropped its capture row")

    // payhost settles it (the late answer / reconciler) and sends payment.captured.
    await eventually(async () => (await payhostPayment(payId)).captured_amount === 7700, 30_000, "payhost to settle the capture")
    await receiver.waitFor((ds) => ds.some((x) => x.type === "payment.captured" && x.processed && x.result?.data?.session_id === session.id), 30_000)
    m = await medusaPayment(payment.id)
    assert.equal(m.captures!.length, 1, "exactly one capture in Medusa")
    assert.equal(sum(m.captures), 77)
    assert.ok(m.captured_at, "Medusa's payment is fully captured")
    const p = await payhostPayment(payId)
    assert.equal(p.captures.length, 1, "payhost captured once")

    // Medusa's own retry of the capture (and a duplicate event) changes nothing.
    await medusa.payment.capturePayment({ payment_id: payment.id })
    assert.equal((await medusaPayment(payment.id)).captures!.length, 1)
    assert.equal((await payhostPayment(payId)).captures.length, 1)
  })

  test("16 concurrent checkouts", async () => {
    const results = await Promise.all(
      Array.from({ length: 16 }, async (_, i) => {
        const amount = 10 + i
        const { session } = await checkout(i % 2 ? SYSTEM : SANDBOX, amount, "eur", i % 2 ? {} : { card_number: OK_CARD })
        const payment = await authorize(session.id)
        await medusa.payment.capturePayment({ payment_id: payment.id })
        return { payment, amount }
      })
    )
    const payhostIds = new Set<string>()
    for (const { payment, amount } of results) {
      const m = await medusaPayment(payment.id)
      const p = await payhostPayment((payment.data as any).payhost_payment_id)
      assert.equal(sum(m.captures), amount)
      assert.equal(p.captured_amount, amount * 100)
      payhostIds.add(p.id)
    }
    assert.equal(payhostIds.size, 16)
  })

  test("a partial capture is refused (Medusa sends providers no amount) and leaves no capture row", async () => {
    const { session } = await checkout(SANDBOX, 40, "eur", { card_number: OK_CARD })
    const payment = await authorize(session.id)
    await assert.rejects(medusa.payment.capturePayment({ payment_id: payment.id, amount: 10 }), /partial captures are not supported/)
    assert.equal((await medusaPayment(payment.id)).captures!.length, 0)
    assert.equal((await payhostPayment((payment.data as any).payhost_payment_id)).captured_amount, 0)
    await medusa.payment.capturePayment({ payment_id: payment.id })
    assert.equal(sum((await medusaPayment(payment.id)).captures), 40)
  })

  test("cancel voids the payhost payment", async () => {
    const { session } = await checkout(SANDBOX, 12, "eur", { card_number: OK_CARD })
    const payment = await authorize(session.id)
    await medusa.payment.cancelPayment(payment.id)
    const p = await payhostPayment((payment.data as any).payhost_payment_id)
    assert.equal(p.status, "canceled")
  })

  test("deleting a session with only Medusa's session id (no payhost ids) finds it by reference", async () => {
    const { session } = await checkout(SANDBOX, 9, "eur", { card_number: OK_CARD })
    const psId = (session.data as any).payhost_session_id
    const provider = (medusa.payment as any).paymentProviderService_.retrieveProvider(SANDBOX)
    await provider.deletePayment({ data: { session_id: session.id } })
    assert.equal((await payhostSession(psId)).status, "canceled")
  })

  test("events of another payhost provider never reach the endpoint (`providers = [\"sandbox\"]`)", async () => {
    const before = receiver.deliveries.length
    const { session } = await checkout(SYSTEM, 3, "eur")
    await authorize(session.id)
    // A sandbox checkout after it: once its events arrived, the system one's would have too.
    const { session: marker } = await checkout(SANDBOX, 4, "eur", { card_number: OK_CARD })
    await authorize(marker.id)
    const psId = (marker.data as any).payhost_session_id
    await receiver.waitFor((ds) =>
      ds.slice(before).some((d) => d.type === "payment_session.authorized" && d.payhostSessionId === psId)
    )
    const foreign = receiver.deliveries.slice(before).filter((x) => x.providerId === "system")
    assert.equal(foreign.length, 0, "no system-provider event reached the sandbox endpoint")
  })

  test("a wrong API key is a clear error and leaves nothing half-made", async () => {
    const bad = await bootMedusaWith({ api_key: "phk_medusa_wrong" })
    try {
      const collection = await bad.payment.createPaymentCollections({ amount: 5, currency_code: "eur" })
      await assert.rejects(
        bad.payment.createPaymentSession(collection.id, { provider_id: SANDBOX, amount: 5, currency_code: "eur", data: {} }),
        /payhost refused the API key/
      )
      assert.equal((await bad.payment.listPaymentSessions({ payment_collection_id: collection.id })).length, 0)
    } finally {
      await bad.shutdown()
      medusa = await bootMedusa(db.url, [
        { id: "sandbox", options: providerOptions(payhost, "sandbox") },
        { id: "system", options: providerOptions(payhost, "system") },
      ])
      receiver.setPayment(medusa.payment)
    }
  })

  test("payhost down: clear errors after retries, nothing half-made in Medusa", async () => {
    const { session } = await checkout(SANDBOX, 21, "eur", { card_number: OK_CARD })
    payhost.kill()
    await new Promise((r) => setTimeout(r, 300))
    const collection = await medusa.payment.createPaymentCollections({ amount: 8, currency_code: "eur" })
    const started = Date.now()
    await assert.rejects(
      medusa.payment.createPaymentSession(collection.id, { provider_id: SANDBOX, amount: 8, currency_code: "eur", data: {} }),
      new RegExp(`payhost unreachable at ${payhost.url.replace(/[.]/g, "\\.")} \\(ECONNREFUSED\\) after 4 tries`)
    )
    assert.ok(Date.now() - started >= 150, "it retried with backoff")
    assert.equal((await medusa.payment.listPaymentSessions({ payment_collection_id: collection.id })).length, 0)
    await assert.rejects(medusa.payment.authorizePaymentSession(session.id, {}), /payhost unreachable/)
    const s = await medusa.payment.retrievePaymentSession(session.id, { relations: ["payment"] })
    assert.equal(s.status, "pending", "the session did not move")
    assert.equal(s.payment ?? null, null, "no Payment was made")

    // Back up: the same session authorizes.
    await payhost.restart()
    const payment = await authorize(session.id)
    assert.ok(payment)
  })
})

async function bootMedusaWith(extra: Record<string, unknown>): Promise<Medusa> {
  await medusa.shutdown()
  return bootMedusa(db.url, [{ id: "sandbox", options: providerOptions(payhost, "sandbox", extra) }])
}

async function authorize(sessionId: string) {
  const payment = await medusa.payment.authorizePaymentSession(sessionId, {})
  assert.ok(payment, `session ${sessionId} was authorized`)
  return payment
}
