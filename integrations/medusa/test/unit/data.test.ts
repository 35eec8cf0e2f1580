import { test } from "node:test"
import assert from "node:assert/strict"
import { providerInput, secretNulls } from "../../src/data"

test("card numbers and security codes are answered as null at any depth", () => {
  assert.deepEqual(
    secretNulls({ card_number: "4242", cvc: "1", CVV: "2", card: { number: "4242", exp_month: 12, cvc: "1" }, email: "x" }),
    { card_number: null, cvc: null, CVV: null, card: { number: null, cvc: null } }
  )
  assert.deepEqual(secretNulls(undefined), {})
  assert.deepEqual(secretNulls({ a: 1 }), {})
})

test("the bridge's own keys are never provider input", () => {
  assert.deepEqual(
    providerInput({ session_id: "payses_1", payhost_session_id: "ps_1", payhost_authorize_seq: 2, payment_method: "pm_1", gone: null }),
    { payment_method: "pm_1" }
  )
})
