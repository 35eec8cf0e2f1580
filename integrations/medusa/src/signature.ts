/**
 * payhost's outgoing-event signature, as `payhost::events::{sign, verify}` do it
 * (host/core/src/events.rs): header `payhost-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
 * "<t>.<raw body>" keyed with the endpoint's secret>`, several `v1=` accepted (a secret being
 * rotated), timestamps further than the tolerance from now refused, compared in constant time.
 */
import { createHmac, timingSafeEqual } from "node:crypto"

export const SIGNATURE_HEADER = "payhost-signature"
export const EVENT_ID_HEADER = "payhost-event-id"
/** Stripe's default, and what the sandbox uses: five minutes either way. */
export const DEFAULT_TOLERANCE_S = 300

export type SignatureFailure = "malformed" | "stale" | "mismatch" | "missing"

export class SignatureError extends Error {
  constructor(public readonly reason: SignatureFailure, message: string) {
    super(message)
    this.name = "SignatureError"
  }
}

/** The header's value for `body` sent at `unixSeconds` (tests, and anyone re-signing). */
export function sign(secret: string, unixSeconds: number, body: string | Uint8Array): string {
  return `t=${unixSeconds},v1=${mac(secret, unixSeconds, body).toString("hex")}`
}

function mac(secret: string, t: number | string, body: string | Uint8Array): Buffer {
  const h = createHmac("sha256", secret)
  h.update(String(t))
  h.update(".")
  h.update(body)
  return h.digest()
}

/**
 * The raw body as bytes. Medusa's webhook route hands over `req.rawBody` (a Buffer); through a
 * serializing event bus (Redis) it arrives as `{ type: "Buffer", data: [...] }`; a string is
 * taken as UTF-8. A parsed object is NOT a raw body: re-serializing it would not give the bytes
 * that were signed, so it is refused.
 */
export function rawBytes(raw: unknown): Buffer {
  if (Buffer.isBuffer(raw)) {
    return raw
  }
  if (raw instanceof Uint8Array) {
    return Buffer.from(raw)
  }
  if (typeof raw === "string") {
    return Buffer.from(raw, "utf8")
  }
  if (
    raw &&
    typeof raw === "object" &&
    (raw as any).type === "Buffer" &&
    Array.isArray((raw as any).data)
  ) {
    return Buffer.from((raw as any).data)
  }
  throw new SignatureError(
    "missing",
    "the webhook's raw body is missing (rawData): payhost's signature covers the exact bytes " +
      "sent, so the parsed body cannot be verified"
  )
}

/** A header's value from Node/Express headers (any case; an array for a repeated header). */
export function headerValue(
  headers: Record<string, unknown> | undefined,
  name: string
): string | undefined {
  if (!headers) {
    return undefined
  }
  const wanted = name.toLowerCase()
  for (const [k, v] of Object.entries(headers)) {
    if (k.toLowerCase() === wanted) {
      if (Array.isArray(v)) {
        return v.join(",")
      }
      return v === undefined || v === null ? undefined : String(v)
    }
  }
  return undefined
}

/**
 * Verifies `header` over `body` with any of `secrets`. Throws a `SignatureError` saying why not.
 * Same rules as payhost's own `verify`: `t` and at least one `v1` required, other keys ignored,
 * |now - t| <= tolerance.
 */
export function verify(
  secrets: readonly string[],
  header: string | undefined,
  body: Buffer,
  nowUnixSeconds: number = Math.floor(Date.now() / 1000),
  toleranceS: number = DEFAULT_TOLERANCE_S
): void {
  if (!header) {
    throw new SignatureError("missing", `the ${SIGNATURE_HEADER} header is missing`)
  }
  let t: string | undefined
  const signatures: Buffer[] = []
  for (const part of header.split(",")) {
    const trimmed = part.trim()
    const eq = trimmed.indexOf("=")
    if (eq < 0) {
      throw new SignatureError("malformed", malformed())
    }
    const key = trimmed.slice(0, eq)
    const value = trimmed.slice(eq + 1)
    if (key === "t") {
      if (!/^-?\d+$/.test(value)) {
        throw new SignatureError("malformed", malformed())
      }
      t = value
    } else if (key === "v1") {
      if (!/^([0-9a-fA-F]{2})*$/.test(value)) {
        throw new SignatureError("malformed", malformed())
      }
      signatures.push(Buffer.from(value, "hex"))
    }
  }
  if (t === undefined || signatures.length === 0) {
    throw new SignatureError("malformed", malformed())
  }
  const skew = Math.abs(nowUnixSeconds - Number(t))
  if (skew > toleranceS) {
    throw new SignatureError(
      "stale",
      `the signature's timestamp is ${skew} s away from now, past the tolerance of ${toleranceS} s ` +
        `(a replayed event, or a skewed clock)`
    )
  }
  for (const secret of secrets) {
    const expected = mac(secret, t, body)
    for (const s of signatures) {
      if (s.length === expected.length && timingSafeEqual(s, expected)) {
        return
      }
    }
  }
  throw new SignatureError(
    "mismatch",
    "no payhost-signature v1 matches the body with the configured webhook_secret(s)"
  )
}

function malformed(): string {
  return `the ${SIGNATURE_HEADER} header is malformed (expected t=<unix seconds>,v1=<hex>)`
}
