/**
 * medusa-payment-payhost: a Medusa v2 payment provider that delegates to payhost over HTTP.
 *
 * medusa-config:
 *   modules: [{ resolve: "@medusajs/medusa/payment", options: { providers: [
 *     { resolve: "medusa-payment-payhost", id: "sandbox", options: { url, api_key, provider: "sandbox", webhook_secret } },
 *   ] } }]
 * gives the provider `pp_payhost_sandbox`.
 */
import { ModuleProvider, Modules } from "@medusajs/framework/utils"
import { PayhostProviderService } from "./service"

export default ModuleProvider(Modules.PAYMENT, {
  services: [PayhostProviderService],
})

export { PayhostProviderService }
export { PayhostClient, PayhostError, errorFor, backoffMs } from "./client"
export type { FailureKind, PayhostErrorBody } from "./client"
export { CURRENCY_EXPONENTS, toMinorUnits, toMajorUnits, toMajorString, AmountError } from "./money"
export { SESSION_STATUS, PAYMENT_STATUS, BEFORE_AUTHORIZE, medusaStatus } from "./status"
export { sign, verify, SignatureError, SIGNATURE_HEADER } from "./signature"
export { idempotencyKey } from "./keys"
export { KEYS, SECRET_FIELDS } from "./data"
export { resolveOptions, OptionsError } from "./options"
export type { PayhostOptions } from "./options"
