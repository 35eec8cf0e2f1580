import { test } from "node:test"
import assert from "node:assert/strict"
import { resolveOptions } from "../../src/options"
import { PayhostProviderService } from "../../src/service"

const good = {
  url: "http://127.0.0.1:8080/",
  api_key: "phk_medusa_abcdef0123456789",
  provider: "sandbox",
  webhook_secret: "whsec_0123456789abcdef",
}

test("good options resolve with defaults", () => {
  const o = resolveOptions(good)
  assert.equal(o.url, "http://127.0.0.1:8080")
  assert.deepEqual(o.webhookSecrets, [good.webhook_secret])
  assert.equal(o.timeoutMs, 30_000)
  assert.equal(o.retries, 3)
  assert.equal(o.webhookToleranceS, 300)
  assert.deepEqual(resolveOptions({ ...good, webhook_secret: ["a".repeat(16), "b".repeat(16)] }).webhookSecrets.length, 2)
})

test("every bad option is named with what is wanted", () => {
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ ...good, url: undefined }, /option `url` is required/],
    [{ ...good, url: "ftp://x" }, /http:\/\/ or https:\/\//],
    [{ ...good, url: "not a url" }, /not a URL/],
    [{ ...good, url: "http://u:p@h" }, /credentials/],
    [{ ...good, url: "http://h/?key=1" }, /query/],
    [{ ...good, api_key: undefined }, /option `api_key` is required.*payhost keys new/],
    [{ ...good, api_key: "sk_test_1" }, /phk_<id>_<secret>/],
    [{ ...good, provider: undefined }, /option `provider` is required/],
    [{ ...good, provider: "Sand Box" }, /option `provider`/],
    [{ ...good, webhook_secret: "short" }, /at least 16 characters/],
    [{ ...good, webhook_secret: [] }, /empty list/],
    [{ ...good, timeout_ms: -1 }, /`timeout_ms` must be an integer/],
    [{ ...good, retries: 1.5 }, /`retries` must be an integer/],
    [{ ...good, tmeout_ms: 5 }, /unknown option `tmeout_ms`/],
  ]
  for (const [options, message] of bad) {
    assert.throws(() => resolveOptions(options), message, JSON.stringify(options))
    assert.throws(() => PayhostProviderService.validateOptions(options), message)
  }
  assert.throws(() => resolveOptions(undefined), /options must be an object/)
})

test("the class has Medusa's identifier and registers as pp_payhost_<id>", () => {
  assert.equal(PayhostProviderService.identifier, "payhost")
  const mod = require("../../src/index").default
  assert.equal(mod.module, "payment")
  assert.deepEqual(mod.services, [PayhostProviderService])
})
