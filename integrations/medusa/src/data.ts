/**
 * What the bridge keeps in Medusa's session/payment `data`, and how it answers so that Medusa's
 * deep merge ends with the right thing stored.
 *
 * Medusa merges the `data` a provider returns into the stored one: `{}` changes nothing, a
 * missing `data` sets it to null (wiping payhost's ids), and a key is removed only by
 * returning it as `null`. So every answer carries `data`, and anything to forget is `null`.
 */

/** Keys the bridge owns in Medusa's data. */
export const KEYS = {
  /** Medusa's own session id (`payses_…`), echoed so later calls can find payhost's session. */
  medusaSessionId: "session_id",
  sessionId: "payhost_session_id",
  collectionId: "payhost_collection_id",
  paymentId: "payhost_payment_id",
  providerId: "payhost_provider_id",
  /** payhost's session status. */
  status: "payhost_status",
  /** payhost's payment status, once there is a payment. */
  paymentStatus: "payhost_payment_status",
  amount: "payhost_amount",
  currency: "payhost_currency_code",
  capturedAmount: "payhost_captured_amount",
  refundedAmount: "payhost_refunded_amount",
  /** What the customer must do (3-D Secure…); null once done. */
  nextAction: "payhost_next_action",
  /** Why it was declined; null otherwise. */
  decline: "payhost_decline",
  /** The processor's data as payhost returns it (intent id, card last four…). */
  providerData: "payhost_provider_data",
  /**
   * Bumped whenever an authorize answer asks for another authorize (requires_more, pending):
   * the next authorize is then a new payhost call, while a retry of the same call replays.
   */
  authorizeSeq: "payhost_authorize_seq",
  /** payhost's account holder (`ach_…`), in Medusa's AccountHolder data. */
  accountHolderId: "payhost_account_holder_id",
  /** The saved method an authorize charges (payhost's `pm_…`, as `listPaymentMethods` gives it). */
  paymentMethodId: "payment_method_id",
} as const

/**
 * Fields that hold card numbers or security codes. payhost's rule: they are never stored. A
 * caller may put them in a session's data (tests do, to pick a sandbox card); the bridge hands
 * them to payhost as transient input and answers them as `null`, so Medusa drops them.
 */
export const SECRET_FIELDS = new Set([
  "card_number",
  "cardnumber",
  "number",
  "pan",
  "cvc",
  "cvv",
  "cvc2",
  "cvv2",
  "cid",
  "csc",
  "card_cvc",
  "card_cvv",
  "security_code",
])

export function isSecretField(key: string): boolean {
  return SECRET_FIELDS.has(key.toLowerCase())
}

type Json = Record<string, unknown>

function isObject(v: unknown): v is Json {
  return !!v && typeof v === "object" && !Array.isArray(v)
}

/**
 * The `null`s that remove every secret field found in `data`, at any depth, shaped for Medusa's
 * deep merge: `{card_number: "4242…", card: {cvc: "123"}}` -> `{card_number: null, card: {cvc: null}}`.
 */
export function secretNulls(data: unknown): Json {
  const out: Json = {}
  if (!isObject(data)) {
    return out
  }
  for (const [k, v] of Object.entries(data)) {
    if (isSecretField(k)) {
      out[k] = null
    } else if (isObject(v)) {
      const inner = secretNulls(v)
      if (Object.keys(inner).length) {
        out[k] = inner
      }
    }
  }
  return out
}

const OWN = new Set<string>(Object.values(KEYS))

/**
 * What to hand payhost as the provider call's transient input: the caller's data without the
 * bridge's own keys (ids, statuses) — a payment method, a card in tests, a 3-D Secure result.
 */
export function providerInput(data: unknown): Json {
  const out: Json = {}
  if (!isObject(data)) {
    return out
  }
  for (const [k, v] of Object.entries(data)) {
    if (!OWN.has(k) && v !== null && v !== undefined) {
      out[k] = v
    }
  }
  return out
}

export function str(data: unknown, key: string): string | undefined {
  if (!isObject(data)) {
    return undefined
  }
  const v = data[key]
  return typeof v === "string" && v ? v : undefined
}

export function num(data: unknown, key: string): number | undefined {
  if (!isObject(data)) {
    return undefined
  }
  const v = data[key]
  return typeof v === "number" && Number.isFinite(v) ? v : undefined
}

/** A payhost payment session (the fields the bridge reads). */
export type PayhostSession = {
  id: string
  payment_collection_id: string
  provider_id: string
  status: string
  amount: number
  currency_code: string
  data?: unknown
  reference?: string | null
  metadata?: unknown
}

/** A payhost payment with its derived amounts (`PaymentView`). */
export type PayhostPayment = {
  id: string
  payment_session_id: string
  payment_collection_id: string
  provider_id: string
  amount: number
  currency_code: string
  status: string
  captured_amount: number
  refunded_amount: number
  data?: unknown
  canceled_at?: number | null
}

/** Medusa data describing a payhost session (no payment fields). */
export function sessionData(s: PayhostSession): Json {
  return {
    [KEYS.sessionId]: s.id,
    [KEYS.collectionId]: s.payment_collection_id,
    [KEYS.providerId]: s.provider_id,
    [KEYS.status]: s.status,
    [KEYS.amount]: s.amount,
    [KEYS.currency]: s.currency_code,
    [KEYS.providerData]: isObject(s.data) ? s.data : {},
  }
}

/** Medusa data describing a payhost payment. */
export function paymentData(p: PayhostPayment): Json {
  return {
    [KEYS.paymentId]: p.id,
    [KEYS.sessionId]: p.payment_session_id,
    [KEYS.collectionId]: p.payment_collection_id,
    [KEYS.providerId]: p.provider_id,
    [KEYS.paymentStatus]: p.status,
    [KEYS.amount]: p.amount,
    [KEYS.currency]: p.currency_code,
    [KEYS.capturedAmount]: p.captured_amount,
    [KEYS.refundedAmount]: p.refunded_amount,
  }
}

/** The Medusa session id a payhost session carries (its `reference`). */
export function medusaSessionIdOf(s: Partial<PayhostSession> | undefined): string | undefined {
  if (!s) {
    return undefined
  }
  if (typeof s.reference === "string" && s.reference) {
    return s.reference
  }
  return undefined
}
