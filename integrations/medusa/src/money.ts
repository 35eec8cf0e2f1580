/**
 * Money: Medusa's decimal major units <-> payhost's integer minor units.
 *
 * The exponent table below MUST equal payhost's `CURRENCIES` table in
 * host/core/src/domain/money.rs (ISO 4217 codes in circulation with their minor-unit exponents;
 * metals, testing and "no currency" codes are absent). `test/unit/money.test.ts` parses that
 * file and fails on any drift.
 */
import { MathBN } from "@medusajs/framework/utils"

/** ISO 4217 code (upper case) -> digits after the decimal point. Same as payhost's table. */
export const CURRENCY_EXPONENTS: Readonly<Record<string, number>> = Object.freeze({
  AED: 2, AFN: 2, ALL: 2, AMD: 2, ANG: 2, AOA: 2, ARS: 2, AUD: 2,
  AWG: 2, AZN: 2, BAM: 2, BBD: 2, BDT: 2, BGN: 2, BHD: 3, BIF: 0,
  BMD: 2, BND: 2, BOB: 2, BOV: 2, BRL: 2, BSD: 2, BTN: 2, BWP: 2,
  BYN: 2, BZD: 2, CAD: 2, CDF: 2, CHE: 2, CHF: 2, CHW: 2, CLF: 4,
  CLP: 0, CNY: 2, COP: 2, COU: 2, CRC: 2, CUP: 2, CVE: 2, CZK: 2,
  DJF: 0, DKK: 2, DOP: 2, DZD: 2, EGP: 2, ERN: 2, ETB: 2, EUR: 2,
  FJD: 2, FKP: 2, GBP: 2, GEL: 2, GHS: 2, GIP: 2, GMD: 2, GNF: 0,
  GTQ: 2, GYD: 2, HKD: 2, HNL: 2, HTG: 2, HUF: 2, IDR: 2, ILS: 2,
  INR: 2, IQD: 3, IRR: 2, ISK: 0, JMD: 2, JOD: 3, JPY: 0, KES: 2,
  KGS: 2, KHR: 2, KMF: 0, KPW: 2, KRW: 0, KWD: 3, KYD: 2, KZT: 2,
  LAK: 2, LBP: 2, LKR: 2, LRD: 2, LSL: 2, LYD: 3, MAD: 2, MDL: 2,
  MGA: 2, MKD: 2, MMK: 2, MNT: 2, MOP: 2, MRU: 2, MUR: 2, MVR: 2,
  MWK: 2, MXN: 2, MXV: 2, MYR: 2, MZN: 2, NAD: 2, NGN: 2, NIO: 2,
  NOK: 2, NPR: 2, NZD: 2, OMR: 3, PAB: 2, PEN: 2, PGK: 2, PHP: 2,
  PKR: 2, PLN: 2, PYG: 0, QAR: 2, RON: 2, RSD: 2, RUB: 2, RWF: 0,
  SAR: 2, SBD: 2, SCR: 2, SDG: 2, SEK: 2, SGD: 2, SHP: 2, SLE: 2,
  SOS: 2, SRD: 2, SSP: 2, STN: 2, SVC: 2, SYP: 2, SZL: 2, THB: 2,
  TJS: 2, TMT: 2, TND: 3, TOP: 2, TRY: 2, TTD: 2, TWD: 2, TZS: 2,
  UAH: 2, UGX: 0, USD: 2, USN: 2, UYI: 0, UYU: 2, UYW: 4, UZS: 2,
  VED: 2, VES: 2, VND: 0, VUV: 0, WST: 2, XAF: 0, XCD: 2, XCG: 2,
  XOF: 0, XPF: 0, YER: 2, ZAR: 2, ZMW: 2, ZWG: 2,
})

/** payhost's largest amount: 2^53 - 1 minor units (exact in every JSON client). */
export const MAX_MINOR_AMOUNT = Number.MAX_SAFE_INTEGER

/** Why an amount cannot be sent to payhost. */
export class AmountError extends Error {
  constructor(message: string) {
    super(message)
    this.name = "AmountError"
  }
}

/** The exponent of `currencyCode` (any case), or a clear error for a code payhost does not know. */
export function exponentOf(currencyCode: string): number {
  const code = String(currencyCode ?? "").toUpperCase()
  const exponent = CURRENCY_EXPONENTS[code]
  if (exponent === undefined) {
    throw new AmountError(
      `currency "${currencyCode}" is not an ISO 4217 currency payhost accepts (its table has ` +
        `the codes in circulation; metals and test codes are refused)`
    )
  }
  return exponent
}

/**
 * A Medusa amount as a plain decimal string with no exponent: Medusa hands providers a number,
 * a numeric string, its BigNumber, a bignumber.js value, or the raw `{ value, precision }` of a
 * stored amount (refunds). `MathBN.convert` reads every one of those exactly.
 */
export function decimalString(amount: unknown): string {
  if (amount === null || amount === undefined || amount === "") {
    throw new AmountError("no amount was given")
  }
  let converted
  try {
    converted = MathBN.convert(amount as any)
  } catch (e) {
    throw new AmountError(`amount ${JSON.stringify(amount)} is not a number`)
  }
  if (!converted.isFinite()) {
    throw new AmountError(`amount ${JSON.stringify(amount)} is not a finite number`)
  }
  return converted.toFixed()
}

/**
 * Major units (Medusa) -> integer minor units (payhost), exactly. Refuses, never rounds:
 * an amount with more decimals than the currency has (200.129 USD, 1.5 JPY) is an error that
 * names the amount and the currency's exponent, as is a zero, negative or too large amount.
 */
export function toMinorUnits(amount: unknown, currencyCode: string): number {
  const exponent = exponentOf(currencyCode)
  const text = decimalString(amount)
  const match = /^(-?)(\d+)(?:\.(\d+))?$/.exec(text)
  if (!match) {
    throw new AmountError(`amount ${text} is not a decimal number`)
  }
  const [, sign, whole, fractionRaw = ""] = match
  const fraction = fractionRaw.replace(/0+$/, "")
  const code = currencyCode.toUpperCase()
  if (fraction.length > exponent) {
    throw new AmountError(
      `amount ${text} ${code} has ${fraction.length} decimals but ${code} has ${exponent}: ` +
        `payhost stores integer minor units and the bridge refuses to round money ` +
        `(round the amount to ${exponent} decimals in Medusa first)`
    )
  }
  const minor = BigInt(whole + fraction.padEnd(exponent, "0"))
  if (sign === "-" || minor <= 0n) {
    throw new AmountError(`amount ${text} ${code} must be positive`)
  }
  if (minor > BigInt(MAX_MINOR_AMOUNT)) {
    throw new AmountError(
      `amount ${text} ${code} is too large for payhost (at most ${MAX_MINOR_AMOUNT} minor units)`
    )
  }
  return Number(minor)
}

/** Integer minor units (payhost) -> major units (Medusa) as an exact decimal string. */
export function toMajorString(minor: number, currencyCode: string): string {
  const exponent = exponentOf(currencyCode)
  if (!Number.isSafeInteger(minor)) {
    throw new AmountError(`minor amount ${minor} is not an integer`)
  }
  const negative = minor < 0
  const digits = String(Math.abs(minor)).padStart(exponent + 1, "0")
  const whole = exponent === 0 ? digits : digits.slice(0, digits.length - exponent)
  const fraction = exponent === 0 ? "" : digits.slice(digits.length - exponent).replace(/0+$/, "")
  return (negative ? "-" : "") + whole + (fraction ? "." + fraction : "")
}

/** Integer minor units (payhost) -> major units (Medusa) as a number (what webhooks carry). */
export function toMajorUnits(minor: number, currencyCode: string): number {
  return Number(toMajorString(minor, currencyCode))
}
