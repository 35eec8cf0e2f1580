import { test } from "node:test"
import assert from "node:assert/strict"
import { idempotencyKey } from "../../src/keys"

test("keys are namespaced per operation, so Medusa's shared key never collides", () => {
  const medusaKey = "payses_01ABC"
  const initiate = idempotencyKey("initiate", medusaKey)
  const authorize0 = idempotencyKey("authorize", medusaKey, 0)
  const authorize1 = idempotencyKey("authorize", medusaKey, 1)
  assert.equal(initiate, "medusa:initiate:payses_01ABC")
  assert.equal(authorize0, "medusa:authorize:payses_01ABC:0")
  assert.equal(authorize1, "medusa:authorize:payses_01ABC:1")
  assert.equal(new Set([initiate, authorize0, authorize1]).size, 3)
  assert.equal(idempotencyKey("capture", "capt_1"), "medusa:capture:capt_1")
  assert.equal(idempotencyKey("refund", "ref_1"), "medusa:refund:ref_1")
  assert.equal(idempotencyKey("cancel", "pay_1"), "medusa:cancel:pay_1")
})

test("a retry of the same call gets the same key", () => {
  assert.equal(idempotencyKey("authorize", "payses_1", 2), idempotencyKey("authorize", "payses_1", 2))
})

test("no key from Medusa, no key sent", () => {
  assert.equal(idempotencyKey("refund", undefined), undefined)
  assert.equal(idempotencyKey("refund", ""), undefined)
})

test("odd characters are made printable", () => {
  assert.equal(idempotencyKey("capture", "a b/c"), "medusa:capture:a_b_c")
})
