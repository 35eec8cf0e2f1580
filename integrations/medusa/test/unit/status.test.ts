import { test } from "node:test"
import assert from "node:assert/strict"
import { PAYMENT_STATUS, SESSION_STATUS, medusaStatus } from "../../src/status"

test("payhost session statuses map as the one table says", () => {
  assert.deepEqual({ ...SESSION_STATUS }, {
    pending: "pending_authorization",
    requires_more: "requires_more",
    authorized: "authorized",
    error: "error",
    canceled: "canceled",
  })
  assert.equal(medusaStatus({ session: "pending" }), "pending_authorization")
  assert.equal(medusaStatus({ session: "pending", beforeAuthorize: true }), "pending")
  assert.equal(medusaStatus({ session: "requires_more", beforeAuthorize: true }), "requires_more")
})

test("a payment's status wins over its session's", () => {
  assert.equal(PAYMENT_STATUS.captured, "captured")
  assert.equal(PAYMENT_STATUS.canceled, "canceled")
  assert.equal(medusaStatus({ session: "authorized", payment: "captured" }), "captured")
  assert.equal(medusaStatus({ session: "authorized", payment: "authorized" }), "authorized")
  assert.equal(medusaStatus({ session: "authorized", payment: "partially_captured" }), "authorized")
  assert.equal(medusaStatus({ session: "authorized", payment: "refunded" }), "captured")
  assert.equal(medusaStatus({ session: "authorized", payment: "canceled" }), "canceled")
})

test("an unknown status is an error, not a guess", () => {
  assert.throws(() => medusaStatus({ session: "weird" }), /unknown session status "weird"/)
  assert.throws(() => medusaStatus({ payment: "weird" }), /unknown payment status "weird"/)
})
