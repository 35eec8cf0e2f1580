import { test } from "node:test"
import assert from "node:assert/strict"
import { existsSync, readFileSync } from "node:fs"
import path from "node:path"
import { BigNumber } from "@medusajs/framework/utils"
import { CURRENCY_EXPONENTS, toMajorString, toMajorUnits, toMinorUnits } from "../../src/money"

/** payhost's money.rs: $PAYHOST_REPO, else the repository this package sits in. */
function moneyRs(): string {
  const repo = process.env.PAYHOST_REPO ?? path.resolve(__dirname, "../../../../..")
  const file = path.join(repo, "host/core/src/domain/money.rs")
  assert.ok(existsSync(file), `payhost's money.rs not found at ${file} (set PAYHOST_REPO)`)
  return readFileSync(file, "utf8")
}

test("the currency table equals payhost's CURRENCIES in money.rs", () => {
  const src = moneyRs()
  const start = src.indexOf("const CURRENCIES")
  assert.ok(start >= 0, "money.rs has no `const CURRENCIES` table")
  const block = src.slice(start, src.indexOf("];", start))
  const rust: Record<string, number> = {}
  for (const m of block.matchAll(/\(\s*"([A-Z]{3})"\s*,\s*(\d+)\s*\)/g)) {
    rust[m[1]] = Number(m[2])
  }
  assert.ok(Object.keys(rust).length > 100, "parsed too few currencies from money.rs")
  assert.deepEqual({ ...CURRENCY_EXPONENTS }, rust)
})

test("major -> minor units with ISO 4217 exponents", () => {
  assert.equal(toMinorUnits(1500, "jpy"), 1500)
  assert.equal(toMinorUnits(15, "EUR"), 1500)
  assert.equal(toMinorUnits("12.34", "eur"), 1234)
  assert.equal(toMinorUnits(12.3, "eur"), 1230)
  assert.equal(toMinorUnits("1.234", "kwd"), 1234)
  assert.equal(toMinorUnits(1.5, "KWD"), 1500)
  assert.equal(toMinorUnits("0.01", "usd"), 1)
  assert.equal(toMinorUnits("10.500", "usd"), 1050, "trailing zeros are not decimals")
  assert.equal(toMinorUnits("1.2345", "clf"), 12345)
})

test("every shape of Medusa amount", () => {
  assert.equal(toMinorUnits(new BigNumber(19.99), "eur"), 1999)
  assert.equal(toMinorUnits(new BigNumber("19.99"), "eur"), 1999)
  assert.equal(toMinorUnits({ value: "19.99", precision: 20 }, "eur"), 1999)
  assert.equal(toMinorUnits({ value: "200", precision: 20 }, "jpy"), 200)
})

test("refuses more decimals than the currency has, never rounds", () => {
  assert.throws(() => toMinorUnits(200.129, "usd"), /200\.129 USD has 3 decimals but USD has 2.*refuses to round/)
  assert.throws(() => toMinorUnits("1.5", "jpy"), /has 1 decimals but JPY has 0/)
  assert.throws(() => toMinorUnits("1.2345", "kwd"), /KWD has 3/)
  assert.throws(() => toMinorUnits({ value: "10.001", precision: 20 }, "eur"), /EUR has 2/)
  assert.throws(() => toMinorUnits(0.1 + 0.2, "eur"), /decimals/)
})

test("refuses zero, negative, too large, unknown currencies and non-numbers", () => {
  assert.throws(() => toMinorUnits(0, "eur"), /must be positive/)
  assert.throws(() => toMinorUnits(-5, "eur"), /must be positive/)
  assert.throws(() => toMinorUnits("90071992547409.92", "eur"), /too large/)
  assert.throws(() => toMinorUnits(10, "xau"), /not an ISO 4217 currency payhost accepts/)
  assert.throws(() => toMinorUnits(10, "euro"), /not an ISO 4217/)
  assert.throws(() => toMinorUnits("abc", "eur"), /not a (finite )?number/)
  assert.throws(() => toMinorUnits(undefined, "eur"), /no amount/)
})

test("minor -> major units", () => {
  assert.equal(toMajorString(1234, "eur"), "12.34")
  assert.equal(toMajorString(1200, "eur"), "12")
  assert.equal(toMajorString(5, "eur"), "0.05")
  assert.equal(toMajorString(1500, "jpy"), "1500")
  assert.equal(toMajorString(1234, "kwd"), "1.234")
  assert.equal(toMajorUnits(1999, "usd"), 19.99)
  for (const [minor, code] of [[1, "kwd"], [99999, "eur"], [7, "jpy"], [123456, "clf"]] as const) {
    assert.equal(toMinorUnits(toMajorString(minor, code), code), minor)
  }
})
