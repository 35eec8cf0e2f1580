import { test } from "node:test"
import assert from "node:assert/strict"
import { createHmac } from "node:crypto"
import { SignatureError, headerValue, rawBytes, sign, verify } from "../../src/signature"

const SECRET = "whsec_medusa_test_0123456789"
const OLD = "whsec_medusa_old_9876543210"
const body = Buffer.from('{"id":"evt_1","type":"payment_session.authorized","data":{"amount":1500}}')
const now = 1_700_000_000

/** Independent of `sign`: the scheme written out (payhost's events::sign). */
function hmacHex(secret: string, t: number, raw: Buffer): string {
  return createHmac("sha256", secret).update(`${t}.`).update(raw).digest("hex")
}

function reason(fn: () => void): string {
  try {
    fn()
  } catch (e) {
    assert.ok(e instanceof SignatureError, String(e))
    return e.reason
  }
  return "accepted"
}

test("sign writes payhost's scheme: t=<seconds>,v1=<hex hmac of t.body>", () => {
  assert.equal(sign(SECRET, now, body), `t=${now},v1=${hmacHex(SECRET, now, body)}`)
})

test("a good signature is accepted", () => {
  verify([SECRET], sign(SECRET, now, body), body, now)
  verify([SECRET], sign(SECRET, now - 299, body), body, now, 300)
  verify([SECRET], sign(SECRET, now + 299, body), body, now, 300)
})

test("a tampered body or a wrong secret is refused", () => {
  const header = sign(SECRET, now, body)
  const tampered = Buffer.from(body.toString().replace("1500", "1"))
  assert.equal(reason(() => verify([SECRET], header, tampered, now)), "mismatch")
  assert.equal(reason(() => verify(["whsec_other_secret_000000"], header, body, now)), "mismatch")
  const flipped = header.slice(0, -1) + (header.endsWith("0") ? "1" : "0")
  assert.equal(reason(() => verify([SECRET], flipped, body, now)), "mismatch")
})

test("a stale or future timestamp is refused", () => {
  assert.equal(reason(() => verify([SECRET], sign(SECRET, now - 301, body), body, now, 300)), "stale")
  assert.equal(reason(() => verify([SECRET], sign(SECRET, now + 301, body), body, now, 300)), "stale")
  // A replay of an old, correctly signed event.
  assert.equal(reason(() => verify([SECRET], sign(SECRET, now - 86_400, body), body, now)), "stale")
})

test("several v1 entries: any match is enough (payhost signing with two secrets)", () => {
  const t = now
  const header = `t=${t},v1=${hmacHex(OLD, t, body)},v1=${hmacHex(SECRET, t, body)}`
  verify([SECRET], header, body, now)
  verify([OLD], header, body, now)
  const reversed = `v1=${hmacHex(SECRET, t, body)}, t=${t}`
  verify([SECRET], reversed, body, now)
})

test("several configured secrets (rotation on Medusa's side)", () => {
  verify([OLD, SECRET], sign(SECRET, now, body), body, now)
  verify([OLD, SECRET], sign(OLD, now, body), body, now)
  assert.equal(reason(() => verify([OLD], sign(SECRET, now, body), body, now)), "mismatch")
})

test("malformed and missing headers are refused", () => {
  assert.equal(reason(() => verify([SECRET], undefined, body, now)), "missing")
  assert.equal(reason(() => verify([SECRET], "garbage", body, now)), "malformed")
  assert.equal(reason(() => verify([SECRET], `t=${now}`, body, now)), "malformed")
  assert.equal(reason(() => verify([SECRET], `v1=${hmacHex(SECRET, now, body)}`, body, now)), "malformed")
  assert.equal(reason(() => verify([SECRET], `t=abc,v1=00`, body, now)), "malformed")
  assert.equal(reason(() => verify([SECRET], `t=${now},v1=zz`, body, now)), "malformed")
  // Unknown keys are ignored, as payhost's verify does (a future v2).
  verify([SECRET], `t=${now},v0=abc,v1=${hmacHex(SECRET, now, body)}`, body, now)
})

test("raw bodies in every shape Medusa hands over", () => {
  assert.deepEqual(rawBytes(body), body)
  assert.deepEqual(rawBytes(body.toString()), body)
  assert.deepEqual(rawBytes(new Uint8Array(body)), body)
  assert.deepEqual(rawBytes(JSON.parse(JSON.stringify(body))), body, "a Buffer through a JSON event bus")
  assert.throws(() => rawBytes(undefined), /raw body is missing/)
  assert.throws(() => rawBytes({ id: "evt_1" }), /raw body is missing/)
})

test("headers in any case, arrays joined", () => {
  assert.equal(headerValue({ "Payhost-Signature": "x" }, "payhost-signature"), "x")
  assert.equal(headerValue({ "payhost-signature": ["t=1", "v1=aa"] }, "payhost-signature"), "t=1,v1=aa")
  assert.equal(headerValue({}, "payhost-signature"), undefined)
})
