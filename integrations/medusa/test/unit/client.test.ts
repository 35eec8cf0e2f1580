import { test } from "node:test"
import assert from "node:assert/strict"
import { PayhostClient, PayhostError, backoffMs, errorFor } from "../../src/client"
import { resolveOptions } from "../../src/options"
import { connRefused, connReset, err, fakeFetch } from "./fake"

const options = resolveOptions({
  url: "http://127.0.0.1:9",
  api_key: "phk_medusa_secret",
  provider: "sandbox",
  retries: 3,
  retry_base_ms: 100,
})

function client(script: Parameters<typeof fakeFetch>[0]) {
  const sleeps: number[] = []
  const fake = fakeFetch(script)
  const c = new PayhostClient(options, async (ms) => void sleeps.push(ms), fake.fetch)
  return { c, sleeps, requests: fake.requests }
}

async function failure(p: Promise<unknown>): Promise<PayhostError> {
  try {
    await p
  } catch (e) {
    assert.ok(e instanceof PayhostError, String(e))
    return e
  }
  assert.fail("expected a PayhostError")
}

test("sends the key, JSON and the Idempotency-Key", async () => {
  const { c, requests } = client([{ status: 201, body: { id: "ps_1" } }])
  assert.deepEqual(await c.post("/v1/payment-sessions", { a: 1 }, { idempotencyKey: "medusa:initiate:payses_1" }), { id: "ps_1" })
  assert.equal(requests[0].headers.authorization, "Bearer phk_medusa_secret")
  assert.equal(requests[0].headers["idempotency-key"], "medusa:initiate:payses_1")
  assert.equal(requests[0].headers["content-type"], "application/json")
  assert.deepEqual(requests[0].body, { a: 1 })
})

test("each payhost error status maps deliberately", () => {
  const cases: [number, string, RegExp][] = [
    [402, "declined", /declined/],
    [409, "outcome_unknown", /outcome .* is unknown.*reconcile/],
    [504, "outcome_unknown", /outcome .* is unknown.*reconcile/],
    [401, "auth", /refused the API key/],
    [403, "auth", /lacks a scope/],
    [404, "not_found", /not found/],
    [422, "invalid_state", /refused/],
    [400, "invalid_request", /invalid.*\(param amount\)/],
    [502, "provider_error", /provider answered/],
    [503, "unavailable", /unavailable/],
    [500, "other", /500/],
  ]
  for (const [status, kind, message] of cases) {
    const e = errorFor(status, err("x", "code_x", "msg", status === 400 ? "amount" : undefined).error, "POST /v1/x", "http://h")
    assert.equal(e.kind, kind, String(status))
    assert.match(e.message, message, String(status))
    assert.equal(e.status, status)
    assert.equal(e.outcomeUnknown, kind === "outcome_unknown")
  }
})

test("connection refused is retried with jittered backoff, then 'payhost unreachable at <url>'", async () => {
  const { c, sleeps, requests } = client([
    { throw: connRefused() },
    { throw: connRefused() },
    { throw: connRefused() },
    { throw: connRefused() },
  ])
  const e = await failure(c.post("/v1/payments/pay_1/capture", {}, {}))
  assert.equal(e.kind, "unreachable")
  assert.match(e.message, /payhost unreachable at http:\/\/127\.0\.0\.1:9 \(ECONNREFUSED\) after 4 tries.*nothing changed/)
  assert.equal(requests.length, 4)
  assert.equal(sleeps.length, 3)
  sleeps.forEach((ms, i) => {
    const step = 100 * 2 ** i
    assert.ok(ms >= step / 2 && ms <= step, `retry ${i + 1}: ${ms} ms not in [${step / 2}, ${step}]`)
  })
})

test("refused then up: the retry succeeds", async () => {
  const { c } = client([{ throw: connRefused() }, { status: 200, body: { ok: true } }])
  assert.deepEqual(await c.get("/v1/payments/pay_1"), { ok: true })
})

test("a cut connection is retried only when the request is idempotent", async () => {
  const keyed = client([{ throw: connReset() }, { status: 200, body: { ok: 1 } }])
  assert.deepEqual(await keyed.c.post("/v1/payments/p/capture", {}, { idempotencyKey: "k" }), { ok: 1 })
  const unkeyed = client([{ throw: connReset() }])
  const e = await failure(unkeyed.c.post("/v1/payments/p/capture", {}))
  assert.equal(e.kind, "outcome_unknown")
  assert.match(e.message, /outcome is unknown/)
})

test("503 is retried for idempotent requests (Retry-After honoured, capped)", async () => {
  const { c, sleeps } = client([
    { status: 503, body: err("api_error", "store.unavailable", "down"), headers: { "retry-after": "1" } },
    { status: 200, body: { ok: 1 } },
  ])
  assert.deepEqual(await c.post("/v1/x", {}, { idempotencyKey: "k" }), { ok: 1 })
  assert.deepEqual(sleeps, [1000])
})

test("a 504 is not retried: the outcome is unknown and reported", async () => {
  const { c, requests } = client([{ status: 504, body: err("outcome_unknown", "outcome_unknown", "timed out") }])
  const e = await failure(c.post("/v1/payments/p/capture", {}, { idempotencyKey: "k" }))
  assert.equal(e.kind, "outcome_unknown")
  assert.equal(requests.length, 1)
})

test("backoff doubles and is drawn in [1/2, 1] of its step", () => {
  assert.equal(backoffMs(100, 1, () => 0), 50)
  assert.equal(backoffMs(100, 1, () => 1), 100)
  assert.equal(backoffMs(100, 3, () => 1), 400)
})
