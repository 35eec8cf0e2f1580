/**
 * Idempotency keys the bridge sends to payhost.
 *
 * payhost replays the first answer for a key (per API key). Medusa gives one key for several
 * operations (`context.idempotency_key = <Medusa session id>` for initiate AND every authorize),
 * so each operation gets its own namespace, and authorize also a sequence number the bridge
 * keeps in Medusa's data: a retry of the same call (nothing stored in between) replays, while
 * the authorize that follows a `requires_more` (or `pending`) answer is a new payhost call.
 */
export const KEY_PREFIX = "medusa"

export type Operation =
  | "initiate"
  | "collection"
  | "update"
  | "authorize"
  | "capture"
  | "refund"
  | "cancel"
  | "account_holder_update"
  | "account_holder_delete"
  | "save_payment_method"
  | "delete_payment_method"

/** payhost caps nothing here, but keep keys short and printable. */
function clean(part: string): string {
  return part.replace(/[^A-Za-z0-9_.:-]/g, "_").slice(0, 200)
}

export function idempotencyKey(op: Operation, key: string | undefined, seq?: number): string | undefined {
  if (!key) {
    return undefined
  }
  const base = `${KEY_PREFIX}:${op}:${clean(key)}`
  return seq === undefined ? base : `${base}:${seq}`
}
