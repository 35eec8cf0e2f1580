/**
 * The one table from payhost's statuses to Medusa's `PaymentSessionStatus`.
 *
 * payhost has a session status (pending, requires_more, authorized, error, canceled) and, once
 * authorized, a payment with a derived status (authorized, partially_captured, captured,
 * partially_refunded, refunded, canceled). Medusa has one status per session. Where both exist
 * the payment decides (a captured payment is `captured` whatever its session says).
 */
import { PaymentSessionStatus } from "@medusajs/framework/utils"

export type PayhostSessionStatus = "pending" | "requires_more" | "authorized" | "error" | "canceled"

export type PayhostPaymentStatus =
  | "authorized"
  | "partially_captured"
  | "captured"
  | "partially_refunded"
  | "refunded"
  | "canceled"

/**
 * payhost session status -> Medusa status.
 *
 * `pending` is payhost's status both before any authorize and while a processor works on an
 * authorization (an asynchronous method). After an authorize call it means the latter, and
 * Medusa's word for it is `pending_authorization` (Medusa then returns no payment and waits for
 * the `authorized` webhook). Before any authorize (initiate, update) the bridge answers
 * Medusa's plain `pending` instead: see `BEFORE_AUTHORIZE`.
 */
export const SESSION_STATUS: Readonly<Record<PayhostSessionStatus, PaymentSessionStatus>> = {
  pending: PaymentSessionStatus.PENDING_AUTHORIZATION,
  requires_more: PaymentSessionStatus.REQUIRES_MORE,
  authorized: PaymentSessionStatus.AUTHORIZED,
  error: PaymentSessionStatus.ERROR,
  canceled: PaymentSessionStatus.CANCELED,
}

/** The same, for answers given before anyone asked to authorize (initiate, update). */
export const BEFORE_AUTHORIZE: Readonly<Partial<Record<PayhostSessionStatus, PaymentSessionStatus>>> = {
  pending: PaymentSessionStatus.PENDING,
}

/**
 * payhost payment status -> Medusa status. A payment with money captured is `captured` (also
 * once refunded: Medusa keeps refunds apart, on its Payment); one with nothing captured yet is
 * `authorized`, partially captured included (Medusa's session has no partial status).
 */
export const PAYMENT_STATUS: Readonly<Record<PayhostPaymentStatus, PaymentSessionStatus>> = {
  authorized: PaymentSessionStatus.AUTHORIZED,
  partially_captured: PaymentSessionStatus.AUTHORIZED,
  captured: PaymentSessionStatus.CAPTURED,
  partially_refunded: PaymentSessionStatus.CAPTURED,
  refunded: PaymentSessionStatus.CAPTURED,
  canceled: PaymentSessionStatus.CANCELED,
}

/** Medusa's status for what payhost says: the payment's when there is one, else the session's. */
export function medusaStatus(input: {
  session?: string | null
  payment?: string | null
  beforeAuthorize?: boolean
}): PaymentSessionStatus {
  if (input.payment) {
    const s = PAYMENT_STATUS[input.payment as PayhostPaymentStatus]
    if (!s) {
      throw new Error(`payhost answered an unknown payment status "${input.payment}"`)
    }
    return s
  }
  const session = input.session as PayhostSessionStatus
  if (input.beforeAuthorize && BEFORE_AUTHORIZE[session]) {
    return BEFORE_AUTHORIZE[session]!
  }
  const s = SESSION_STATUS[session]
  if (!s) {
    throw new Error(`payhost answered an unknown session status "${input.session}"`)
  }
  return s
}
