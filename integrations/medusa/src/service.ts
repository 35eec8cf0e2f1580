/**
 * PayhostProviderService: a Medusa v2 payment provider that delegates every operation to a
 * running `payhost serve` over HTTP.
 *
 * Registered as `{ resolve: "medusa-payment-payhost", id: "<id>", options }` under the Payment
 * Module's providers, it becomes `pp_payhost_<id>`; one class serves several payhost providers
 * (`pp_payhost_sandbox`, `pp_payhost_system`), each with its own options.
 */
import { AbstractPaymentProvider, MedusaError, PaymentActions, PaymentSessionStatus } from "@medusajs/framework/utils"
import type {
  AuthorizePaymentInput,
  AuthorizePaymentOutput,
  CancelPaymentInput,
  CancelPaymentOutput,
  CapturePaymentInput,
  CapturePaymentOutput,
  DeletePaymentInput,
  DeletePaymentOutput,
  GetPaymentStatusInput,
  GetPaymentStatusOutput,
  InitiatePaymentInput,
  InitiatePaymentOutput,
  ProviderWebhookPayload,
  RefundPaymentInput,
  RefundPaymentOutput,
  RetrievePaymentInput,
  RetrievePaymentOutput,
  UpdatePaymentInput,
  UpdatePaymentOutput,
  WebhookActionResult,
  CreateAccountHolderInput,
  CreateAccountHolderOutput,
  UpdateAccountHolderInput,
  UpdateAccountHolderOutput,
  DeleteAccountHolderInput,
  DeleteAccountHolderOutput,
  RetrieveAccountHolderInput,
  RetrieveAccountHolderOutput,
  ListPaymentMethodsInput,
  ListPaymentMethodsOutput,
  SavePaymentMethodInput,
  SavePaymentMethodOutput,
  DeletePaymentMethodInput,
  DeletePaymentMethodOutput,
} from "@medusajs/framework/types"

import { PayhostClient, PayhostError } from "./client"
import {
  KEYS,
  PayhostPayment,
  PayhostSession,
  medusaSessionIdOf,
  num,
  paymentData,
  providerInput,
  secretNulls,
  sessionData,
  str,
} from "./data"
import { idempotencyKey } from "./keys"
import { AmountError, toMajorUnits, toMinorUnits } from "./money"
import { PayhostOptions, ResolvedOptions, resolveOptions } from "./options"
import { SIGNATURE_HEADER, headerValue, rawBytes, verify } from "./signature"
import { medusaStatus } from "./status"

type Json = Record<string, unknown>

/** What `POST /v1/payment-sessions/{id}/authorize` answers with 200. */
type AuthorizeResult = {
  payment_session: PayhostSession
  payment: (Omit<PayhostPayment, "status" | "captured_amount" | "refunded_amount"> & {
    captures?: { amount: number }[]
    refunds?: { amount: number }[]
  }) | null
  next_action?: unknown
  decline?: { code?: string | null; message: string } | null
}

/** payhost's payment status, derived as `Payment::status` does (the authorize answer has none). */
export function derivePaymentStatus(p: {
  amount: number
  canceled_at?: unknown
  captures?: { amount: number }[]
  refunds?: { amount: number }[]
}): { status: string; captured: number; refunded: number } {
  const captured = (p.captures ?? []).reduce((a, c) => a + c.amount, 0)
  const refunded = (p.refunds ?? []).reduce((a, r) => a + r.amount, 0)
  let status: string
  if (p.canceled_at) status = "canceled"
  else if (refunded > 0 && refunded >= captured) status = "refunded"
  else if (refunded > 0) status = "partially_refunded"
  else if (captured >= p.amount) status = "captured"
  else if (captured > 0) status = "partially_captured"
  else status = "authorized"
  return { status, captured, refunded }
}

function toView(p: NonNullable<AuthorizeResult["payment"]>): PayhostPayment {
  const d = derivePaymentStatus(p)
  return { ...p, status: d.status, captured_amount: d.captured, refunded_amount: d.refunded }
}

function amountError(e: unknown): never {
  if (e instanceof AmountError) {
    throw new MedusaError(MedusaError.Types.INVALID_DATA, `payhost bridge: ${e.message}`)
  }
  throw e
}

/** Medusa's payment fields, all cleared: a session that has (or has again) no payment. */
const NO_PAYMENT: Json = {
  [KEYS.paymentId]: null,
  [KEYS.paymentStatus]: null,
  [KEYS.capturedAmount]: null,
  [KEYS.refundedAmount]: null,
}

export class PayhostProviderService extends AbstractPaymentProvider<PayhostOptions> {
  static override identifier = "payhost"

  /** Called by Medusa's loader before the constructor: refuse bad options at start-up. */
  static override validateOptions(options: Record<any, any>): void {
    resolveOptions(options)
  }

  protected readonly options_: ResolvedOptions
  protected readonly client_: PayhostClient
  protected readonly logger_: { warn: (m: string) => void; info: (m: string) => void; error: (m: string) => void }

  constructor(cradle: Record<string, unknown>, options: PayhostOptions) {
    super(cradle, options)
    this.options_ = resolveOptions(options)
    this.client_ = new PayhostClient(this.options_)
    let logger: any
    try {
      logger = (cradle as any)?.logger
    } catch {
      logger = undefined
    }
    this.logger_ = logger ?? console
  }

  // ---------------------------------------------------------------------------------------
  // Sessions
  // ---------------------------------------------------------------------------------------

  /**
   * Medusa created its session row (`data.session_id`, `context.idempotency_key`: its id) and asks
   * for the processor's side: one payhost session (with its collection) per Medusa session.
   */
  async initiatePayment(input: InitiatePaymentInput): Promise<InitiatePaymentOutput> {
    const { amount, currency_code, data, context } = input
    const reference = str(data, KEYS.medusaSessionId)
    const key = context?.idempotency_key ?? reference
    let minor: number
    try {
      minor = toMinorUnits(amount, currency_code)
    } catch (e) {
      amountError(e)
    }
    let session: PayhostSession
    try {
      session = await this.createSession_({
        amount: minor,
        currency_code: currency_code.toLowerCase(),
        reference,
        key,
        input: providerInput(data),
        context: this.contextFor_(context),
        accountHolderId: str(context?.account_holder?.data, KEYS.accountHolderId),
      })
    } catch (e) {
      if (reference && e instanceof PayhostError && (e.outcomeUnknown || e.kind === "other")) {
        // Medusa deletes its row when this throws and never asks again for this id: a payhost
        // session that was created anyway would be an orphan. Cancel it if it is there.
        await this.cancelByReference_(reference).catch(() => undefined)
      }
      throw e
    }
    return {
      id: session.id,
      status: medusaStatus({ session: session.status, beforeAuthorize: true }),
      data: {
        ...secretNulls(data),
        ...(reference ? { [KEYS.medusaSessionId]: reference } : {}),
        ...sessionData(session),
        ...NO_PAYMENT,
        [KEYS.authorizeSeq]: 0,
        [KEYS.nextAction]: null,
        [KEYS.decline]: null,
      },
    }
  }

  /**
   * Medusa's `updatePaymentSession` passes the CALLER's data (not the stored one): it must hold
   * `payhost_session_id` (pass `{ ...session.data, ...changes }`) or Medusa's `session_id`.
   */
  async updatePayment(input: UpdatePaymentInput): Promise<UpdatePaymentOutput> {
    const { amount, currency_code, data, context } = input
    const sessionId = await this.sessionIdOf_(data, "update")
    const storedCurrency = str(data, KEYS.currency)
    if (storedCurrency && currency_code && storedCurrency.toLowerCase() !== currency_code.toLowerCase()) {
      throw new MedusaError(
        MedusaError.Types.INVALID_DATA,
        `payhost bridge: a session's currency cannot change (${storedCurrency} -> ${currency_code}); create a new session`
      )
    }
    const body: Json = {}
    if (amount !== undefined && amount !== null) {
      try {
        body.amount = toMinorUnits(amount, currency_code ?? storedCurrency ?? "")
      } catch (e) {
        amountError(e)
      }
    }
    const forProvider = providerInput(data)
    if (Object.keys(forProvider).length) {
      body.data = forProvider
    }
    const ctx = this.contextFor_(context)
    if (ctx) {
      body.context = ctx
    }
    const session = await this.client_.post<PayhostSession>(`/v1/payment-sessions/${enc(sessionId)}`, body, {
      idempotencyKey: idempotencyKey("update", context?.idempotency_key),
    })
    return {
      status: medusaStatus({ session: session.status, beforeAuthorize: !num(data, KEYS.authorizeSeq) }),
      data: { ...secretNulls(data), ...sessionData(session) },
    }
  }

  /**
   * Medusa deletes a session (a new session for the cart, a workflow's compensation). Deleting a
   * session payhost already declined or canceled is success; an authorized one is voided.
   */
  async deletePayment(input: DeletePaymentInput): Promise<DeletePaymentOutput> {
    const data = input.data ?? {}
    let sessionId = str(data, KEYS.sessionId)
    if (!sessionId) {
      const reference = str(data, KEYS.medusaSessionId)
      if (!reference) {
        // Medusa's rollback of a failed createPaymentSession passes the caller's data only:
        // nothing names a payhost session. An initiated payhost session left behind is
        // `pending` (holds no money) and was cancelled by initiatePayment's own cleanup if
        // that call failed.
        this.logger_.warn(
          "payhost bridge: deletePayment without payhost_session_id or session_id: nothing to delete"
        )
        return { data: {} }
      }
      await this.cancelByReference_(reference)
      return { data: { ...secretNulls(data) } }
    }
    return { data: { ...secretNulls(data), ...(await this.deleteSession_(sessionId, data)) } }
  }

  // ---------------------------------------------------------------------------------------
  // Account holders and saved payment methods
  // ---------------------------------------------------------------------------------------

  /**
   * Medusa creates a customer's AccountHolder for this provider: payhost creates its account
   * holder (the customer at the processor).
   */
  async createAccountHolder(input: CreateAccountHolderInput): Promise<CreateAccountHolderOutput> {
    const customer = input.context?.customer
    if (!customer?.id) {
      throw new MedusaError(MedusaError.Types.INVALID_DATA, "payhost bridge: createAccountHolder needs context.customer.id")
    }
    const holder = await this.client_.post<PayhostAccountHolder>(
      "/v1/account-holders",
      {
        provider_id: this.options_.provider,
        customer: customerOf(customer),
        ...(Object.keys(providerInput(input.data)).length ? { data: providerInput(input.data) } : {}),
      }
      // No key: payhost keeps one live holder per customer and provider, so a retry gets the
      // same one, while a key (Medusa's is the customer id) would replay a holder deleted since.
    )
    return { id: holder.id, data: holderData(holder) }
  }

  /** The customer's details changed in Medusa: payhost updates them at the processor. */
  async updateAccountHolder(input: UpdateAccountHolderInput): Promise<UpdateAccountHolderOutput> {
    const id = holderIdOf(input.context?.account_holder)
    const customer = input.context?.customer
    if (!customer?.id) {
      return { data: input.context?.account_holder?.data ?? {} }
    }
    const holder = await this.client_.post<PayhostAccountHolder>(
      `/v1/account-holders/${enc(id)}`,
      { customer: customerOf(customer) },
      { idempotencyKey: idempotencyKey("account_holder_update", input.context?.idempotency_key) }
    )
    return { data: holderData(holder) }
  }

  /** Deletes the customer at the processor: every method saved to it is detached. */
  async deleteAccountHolder(input: DeleteAccountHolderInput): Promise<DeleteAccountHolderOutput> {
    const id = holderIdOf(input.context?.account_holder)
    const holder = await this.client_.delete<PayhostAccountHolder>(`/v1/account-holders/${enc(id)}`, {
      idempotencyKey: idempotencyKey("account_holder_delete", id),
    })
    return { data: holderData(holder) }
  }

  async retrieveAccountHolder(input: RetrieveAccountHolderInput): Promise<RetrieveAccountHolderOutput> {
    const view = await this.client_.get<PayhostAccountHolder>(`/v1/account-holders/${enc(input.id)}`)
    return { id: view.id, data: holderData(view) }
  }

  /** The methods saved to the customer's account holder at this provider. */
  async listPaymentMethods(input: ListPaymentMethodsInput): Promise<ListPaymentMethodsOutput> {
    const id = holderIdOf(input.context?.account_holder)
    const list = await this.client_.get<{ payment_methods: PayhostPaymentMethod[] }>(
      `/v1/account-holders/${enc(id)}/payment-methods`
    )
    return (list.payment_methods ?? []).map((m) => ({ id: m.id, data: methodData(m) }))
  }

  /**
   * Saves a method (a card in tests, a processor token) to the customer's account holder. The
   * card fields are handed to payhost for that call only; Medusa's stored data gets `null`s.
   */
  async savePaymentMethod(input: SavePaymentMethodInput): Promise<SavePaymentMethodOutput> {
    const id = holderIdOf(input.context?.account_holder)
    const method = await this.client_.post<PayhostPaymentMethod>(
      `/v1/account-holders/${enc(id)}/payment-methods`,
      { data: providerInput(input.data) },
      { idempotencyKey: idempotencyKey("save_payment_method", input.context?.idempotency_key) }
    )
    return { id: method.id, data: { ...secretNulls(input.data), ...methodData(method) } }
  }

  async deletePaymentMethod(input: DeletePaymentMethodInput): Promise<DeletePaymentMethodOutput> {
    const id = holderIdOf(input.context?.account_holder)
    const method = await this.client_.delete<PayhostPaymentMethod>(
      `/v1/account-holders/${enc(id)}/payment-methods/${enc(input.data.id)}`,
      { idempotencyKey: idempotencyKey("delete_payment_method", input.data.id) }
    )
    return { data: methodData(method) }
  }


  /**
   * Authorize with payhost. Medusa sends the stored data and `idempotency_key = <Medusa session
   * id>` every time; the key sent to payhost adds the operation and the bridge's sequence number.
   */
  async authorizePayment(input: AuthorizePaymentInput): Promise<AuthorizePaymentOutput> {
    const data = input.data ?? {}
    const context = input.context
    const sessionId = await this.sessionIdOf_(data, "authorize")
    const seq = num(data, KEYS.authorizeSeq) ?? 0
    const key = idempotencyKey(
      "authorize",
      context?.idempotency_key ?? str(data, KEYS.medusaSessionId) ?? sessionId,
      seq
    )
    const body: Json = {}
    const forProvider = providerInput(data)
    const method = str(data, KEYS.paymentMethodId)
    if (method) {
      // A method saved to the session's account holder: charged without card input.
      body.payment_method_id = method
    }
    if (Object.keys(forProvider).length) {
      body.data = forProvider
    }
    const ctx = this.contextFor_(context)
    if (ctx) {
      body.context = ctx
    }
    const nulls = secretNulls(data)
    let result: AuthorizeResult
    try {
      result = await this.client_.post<AuthorizeResult>(
        `/v1/payment-sessions/${enc(sessionId)}/authorize`,
        body,
        { idempotencyKey: key }
      )
    } catch (e) {
      if (e instanceof PayhostError && e.kind === "declined") {
        // Declined: stored by Medusa as `error` (Medusa then refuses the authorization itself).
        return {
          status: PaymentSessionStatus.ERROR,
          data: {
            ...nulls,
            [KEYS.status]: "error",
            [KEYS.nextAction]: null,
            [KEYS.decline]: declineOf(e),
          },
        }
      }
      if (e instanceof PayhostError && e.kind === "invalid_state") {
        // The session moved on (declined, canceled) before this call: say where it stands.
        const s = await this.client_.get<PayhostSession>(`/v1/payment-sessions/${enc(sessionId)}`)
        if (s.status === "error" || s.status === "canceled") {
          return {
            status: medusaStatus({ session: s.status }),
            data: { ...nulls, ...sessionData(s), [KEYS.nextAction]: null },
          }
        }
      }
      throw e
    }
    const s = result.payment_session
    if (result.payment) {
      const view = toView(result.payment)
      return {
        // payhost's authorize never captures: Medusa gets `authorized` and creates its Payment.
        status: view.status === "canceled" ? PaymentSessionStatus.CANCELED : PaymentSessionStatus.AUTHORIZED,
        data: {
          ...nulls,
          ...sessionData(s),
          ...paymentData(view),
          [KEYS.status]: s.status,
          [KEYS.nextAction]: null,
          [KEYS.decline]: null,
        },
      }
    }
    const again = s.status === "requires_more" || s.status === "pending"
    return {
      status: medusaStatus({ session: s.status }),
      data: {
        ...nulls,
        ...sessionData(s),
        [KEYS.nextAction]: s.status === "requires_more" ? (result.next_action ?? null) : null,
        [KEYS.decline]: result.decline ? { code: result.decline.code ?? null, message: result.decline.message } : null,
        ...(again ? { [KEYS.authorizeSeq]: seq + 1 } : {}),
      },
    }
  }

  // ---------------------------------------------------------------------------------------
  // Payments
  // ---------------------------------------------------------------------------------------

  /**
   * Medusa sends no amount (it created its Capture row first, `idempotency_key = capture.id`):
   * the bridge captures what remains. A payment with nothing left to capture is answered as
   * captured without a second capture — that is how a capture whose outcome was unknown (payhost
   * 504), settled later and reported by `payment.captured`, reaches Medusa's books once.
   */
  async capturePayment(input: CapturePaymentInput): Promise<CapturePaymentOutput> {
    const data = input.data ?? {}
    const paymentId = this.paymentIdOf_(data, "capture")
    const current = await this.client_.get<PayhostPayment>(`/v1/payments/${enc(paymentId)}`)
    if (current.status === "canceled") {
      throw new MedusaError(
        MedusaError.Types.NOT_ALLOWED,
        `payhost bridge: payment ${paymentId} is canceled at payhost and cannot be captured`
      )
    }
    const remaining = current.amount - current.captured_amount
    if (remaining <= 0) {
      return { data: paymentData(current) }
    }
    const asked = await this.medusaCaptureAmount_(input.context?.idempotency_key, current.currency_code)
    if (asked !== undefined && asked < remaining) {
      throw new MedusaError(
        MedusaError.Types.NOT_ALLOWED,
        `payhost bridge: partial captures are not supported — Medusa does not tell providers how much to ` +
          `capture, so the bridge captures everything that remains (${toMajorUnits(remaining, current.currency_code)} ` +
          `${current.currency_code.toUpperCase()}); capture the full amount instead of ${toMajorUnits(asked, current.currency_code)}`
      )
    }
    try {
      const view = await this.client_.post<PayhostPayment>(
        `/v1/payments/${enc(paymentId)}/capture`,
        {},
        { idempotencyKey: idempotencyKey("capture", input.context?.idempotency_key ?? paymentId) }
      )
      return { data: paymentData(view) }
    } catch (e) {
      if (e instanceof PayhostError && e.kind === "invalid_state") {
        // Captured meanwhile (a racing capture, a webhook): answer where it stands if it is done.
        const after = await this.client_.get<PayhostPayment>(`/v1/payments/${enc(paymentId)}`)
        if (after.amount - after.captured_amount <= 0) {
          return { data: paymentData(after) }
        }
      }
      throw e
    }
  }

  /** Medusa sends the amount (`{value, precision}`) but no currency: the stored one is used. */
  async refundPayment(input: RefundPaymentInput): Promise<RefundPaymentOutput> {
    const data = input.data ?? {}
    const paymentId = this.paymentIdOf_(data, "refund")
    const currency = str(data, KEYS.currency)
    if (!currency) {
      throw new MedusaError(
        MedusaError.Types.INVALID_DATA,
        `payhost bridge: the payment's data has no ${KEYS.currency}: cannot tell the refund's currency`
      )
    }
    let minor: number
    try {
      minor = toMinorUnits(input.amount, currency)
    } catch (e) {
      amountError(e)
    }
    const key = idempotencyKey("refund", input.context?.idempotency_key)
    try {
      const view = await this.client_.post<PayhostPayment>(
        `/v1/payments/${enc(paymentId)}/refund`,
        { amount: minor },
        { idempotencyKey: key }
      )
      return { data: paymentData(view) }
    } catch (e) {
      if (e instanceof PayhostError && e.outcomeUnknown) {
        // Medusa deletes its Refund row when this throws, and has no webhook action for refunds:
        // say how to check before anyone refunds again.
        throw new PayhostError(
          "outcome_unknown",
          `${e.message}. Before refunding again, check payment ${paymentId} at payhost ` +
            `(GET /v1/payments/${paymentId}: refunded_amount): a refund settled later is not reported to Medusa`,
          e.status,
          e.payhost
        )
      }
      throw e
    }
  }

  /** Void an authorized payment (Medusa: `idempotency_key = payment.id`, or none in a rollback). */
  async cancelPayment(input: CancelPaymentInput): Promise<CancelPaymentOutput> {
    const data = input.data ?? {}
    const paymentId = str(data, KEYS.paymentId)
    if (!paymentId) {
      // Nothing was authorized: cancel the session, if any.
      const sessionId = str(data, KEYS.sessionId)
      if (!sessionId) {
        return { data: {} }
      }
      return { data: await this.deleteSession_(sessionId, data) }
    }
    if (!input.context?.idempotency_key && (await this.medusaHasPayment_(str(data, KEYS.medusaSessionId), paymentId))) {
      // Medusa's authorizePaymentSession rolls back with cancelPayment (and no key) when it
      // could not record the Payment — also when a concurrent authorize of the same session (a
      // webhook's) recorded it first. Voiding then would cancel the payment Medusa keeps.
      this.logger_.warn(
        `payhost bridge: not voiding ${paymentId}: Medusa already records a Payment for it (a concurrent authorize)`
      )
      return { data: {} }
    }
    return { data: await this.cancelPayment_(paymentId, input.context?.idempotency_key) }
  }

  async retrievePayment(input: RetrievePaymentInput): Promise<RetrievePaymentOutput> {
    const data = input.data ?? {}
    const paymentId = str(data, KEYS.paymentId)
    if (paymentId) {
      return { data: paymentData(await this.client_.get<PayhostPayment>(`/v1/payments/${enc(paymentId)}`)) }
    }
    const sessionId = await this.sessionIdOf_(data, "retrieve")
    return { data: sessionData(await this.client_.get<PayhostSession>(`/v1/payment-sessions/${enc(sessionId)}`)) }
  }

  async getPaymentStatus(input: GetPaymentStatusInput): Promise<GetPaymentStatusOutput> {
    const data = input.data ?? {}
    const paymentId = str(data, KEYS.paymentId)
    if (paymentId) {
      const p = await this.client_.get<PayhostPayment>(`/v1/payments/${enc(paymentId)}`)
      return { status: medusaStatus({ payment: p.status }), data: paymentData(p) }
    }
    const sessionId = await this.sessionIdOf_(data, "get the status of")
    const s = await this.client_.get<PayhostSession>(`/v1/payment-sessions/${enc(sessionId)}`)
    return {
      status: medusaStatus({ session: s.status, beforeAuthorize: !num(data, KEYS.authorizeSeq) }),
      data: sessionData(s),
    }
  }

  // ---------------------------------------------------------------------------------------
  // Webhooks: payhost's outbox POSTs signed events to /hooks/payment/payhost_<id>
  // ---------------------------------------------------------------------------------------

  async getWebhookActionAndData(payload: ProviderWebhookPayload["payload"]): Promise<WebhookActionResult> {
    if (!this.options_.webhookSecrets.length) {
      throw new MedusaError(
        MedusaError.Types.INVALID_DATA,
        "payhost bridge: no `webhook_secret` is configured, so payhost's events cannot be verified"
      )
    }
    const body = rawBytes(payload.rawData)
    verify(
      this.options_.webhookSecrets,
      headerValue(payload.headers as Record<string, unknown>, SIGNATURE_HEADER),
      body,
      Math.floor(Date.now() / 1000),
      this.options_.webhookToleranceS
    )
    let event: any
    try {
      event = JSON.parse(body.toString("utf8"))
    } catch {
      throw new MedusaError(MedusaError.Types.INVALID_DATA, "payhost bridge: the event body is not JSON")
    }
    const notSupported: WebhookActionResult = { action: PaymentActions.NOT_SUPPORTED }
    const entity = event?.data ?? {}
    if (entity.provider_id !== undefined && entity.provider_id !== this.options_.provider) {
      // An event of another payhost provider (its endpoint lacks `providers = [...]`).
      return notSupported
    }
    const currency = event?.currency_code ?? entity.currency_code
    const amountMinor = typeof event?.amount === "number" ? event.amount : entity.amount
    switch (event?.type) {
      case "payment_session.authorized": {
        const sessionId = medusaSessionIdOf(entity)
        if (!sessionId || typeof amountMinor !== "number" || !currency) {
          return notSupported
        }
        return {
          action: PaymentActions.AUTHORIZED,
          data: { session_id: sessionId, amount: toMajorUnits(amountMinor, currency) },
        }
      }
      case "payment.captured": {
        // The event's data is the payment, which does not carry the session's reference.
        const payhostSessionId = entity.payment_session_id ?? event.payment_session_id
        if (!payhostSessionId || typeof amountMinor !== "number" || !currency) {
          return notSupported
        }
        const s = await this.client_.get<PayhostSession>(`/v1/payment-sessions/${enc(payhostSessionId)}`)
        const sessionId = medusaSessionIdOf(s)
        if (!sessionId) {
          return notSupported
        }
        return {
          action: PaymentActions.SUCCESSFUL,
          data: { session_id: sessionId, amount: toMajorUnits(amountMinor, currency) },
        }
      }
      default:
        return notSupported
    }
  }

  // ---------------------------------------------------------------------------------------
  // Account holders and saved payment methods: not yet (a later issue). Medusa's payment
  // provider service treats these as optional (`provider.createAccountHolder?`): leaving them
  // out makes Medusa log "does not support …" and go on. They will go here:
  //   createAccountHolder / updateAccountHolder / deleteAccountHolder / retrieveAccountHolder
  //   listPaymentMethods / savePaymentMethod / deletePaymentMethod
  // ---------------------------------------------------------------------------------------

  // ---------------------------------------------------------------------------------------
  // Helpers
  // ---------------------------------------------------------------------------------------

  /** What of Medusa's context payhost keeps on the session (no idempotency key, no account holder). */
  protected contextFor_(context: InitiatePaymentInput["context"] | undefined): Json | undefined {
    if (!context) {
      return undefined
    }
    const { idempotency_key: _k, account_holder: _a, ...rest } = context as Json
    return Object.keys(rest).length ? rest : undefined
  }

  /**
   * One round trip: `POST /v1/payment-sessions` with the amount, the currency and Medusa's
   * session id as `reference` creates the session and its collection in one payhost write.
   */
  protected async createSession_(args: {
    amount: number
    currency_code: string
    reference?: string
    key?: string
    input: Json
    context?: Json
    accountHolderId?: string
  }): Promise<PayhostSession> {
    return this.client_.post<PayhostSession>(
      "/v1/payment-sessions",
      {
        provider_id: this.options_.provider,
        amount: args.amount,
        currency_code: args.currency_code,
        data: args.input,
        ...(args.reference ? { reference: args.reference } : {}),
        ...(args.context ? { context: args.context } : {}),
        ...(args.accountHolderId ? { account_holder_id: args.accountHolderId } : {}),
      },
      { idempotencyKey: idempotencyKey("initiate", args.key) }
    )
  }

  /** payhost's sessions created with this reference (Medusa's session id). */
  protected async sessionsByReference_(reference: string): Promise<PayhostSession[]> {
    const list = await this.client_.get<{ payment_sessions: PayhostSession[] }>("/v1/payment-sessions", {
      query: { reference },
    })
    return (list.payment_sessions ?? []).filter((s) => medusaSessionIdOf(s) === reference)
  }

  protected async cancelByReference_(reference: string): Promise<void> {
    for (const s of await this.sessionsByReference_(reference)) {
      if (s.provider_id === this.options_.provider) {
        await this.deleteSession_(s.id, {})
      }
    }
  }

  /** DELETE a payhost session; an already declined/canceled one is fine, an authorized one is voided. */
  protected async deleteSession_(sessionId: string, data: Json): Promise<Json> {
    try {
      const s = await this.client_.delete<PayhostSession>(`/v1/payment-sessions/${enc(sessionId)}`)
      return { ...sessionData(s), [KEYS.nextAction]: null }
    } catch (e) {
      if (!(e instanceof PayhostError)) {
        throw e
      }
      if (e.kind === "not_found") {
        return {}
      }
      if (e.kind !== "invalid_state") {
        throw e
      }
      const s = await this.client_.get<PayhostSession>(`/v1/payment-sessions/${enc(sessionId)}`)
      if (s.status === "error" || s.status === "canceled") {
        return { ...sessionData(s), [KEYS.nextAction]: null }
      }
      if (s.status === "authorized") {
        const paymentId = str(data, KEYS.paymentId) ?? (await this.paymentOfSession_(s))
        if (paymentId) {
          return { ...sessionData(s), ...(await this.cancelPayment_(paymentId, undefined)) }
        }
      }
      throw e
    }
  }

  protected async cancelPayment_(paymentId: string, key: string | undefined): Promise<Json> {
    try {
      const view = await this.client_.post<PayhostPayment>(`/v1/payments/${enc(paymentId)}/cancel`, {}, {
        idempotencyKey: idempotencyKey("cancel", key ?? paymentId),
      })
      return paymentData(view)
    } catch (e) {
      if (e instanceof PayhostError && e.kind === "invalid_state") {
        const p = await this.client_.get<PayhostPayment>(`/v1/payments/${enc(paymentId)}`)
        if (p.status === "canceled") {
          return paymentData(p)
        }
      }
      throw e
    }
  }

  /** The payment of an authorized session (payhost's session does not name it; its collection does). */
  protected async paymentOfSession_(s: PayhostSession): Promise<string | undefined> {
    const c = await this.client_.get<{ payments?: { id: string; payment_session_id: string }[] }>(
      `/v1/payment-collections/${enc(s.payment_collection_id)}`
    )
    return c.payments?.find((p) => p.payment_session_id === s.id)?.id
  }

  protected async sessionIdOf_(data: unknown, what: string): Promise<string> {
    const id = str(data, KEYS.sessionId)
    if (id) {
      return id
    }
    const reference = str(data, KEYS.medusaSessionId)
    if (reference) {
      const found = (await this.sessionsByReference_(reference)).filter(
        (s) => s.provider_id === this.options_.provider
      )
      if (found.length) {
        return found[found.length - 1].id
      }
    }
    throw new MedusaError(
      MedusaError.Types.INVALID_DATA,
      `payhost bridge: cannot ${what} a session whose data has no ${KEYS.sessionId}` +
        (reference ? ` (and payhost has no session with reference ${reference})` : "") +
        ": pass the session's stored data"
    )
  }

  protected paymentIdOf_(data: unknown, what: string): string {
    const id = str(data, KEYS.paymentId)
    if (!id) {
      throw new MedusaError(
        MedusaError.Types.INVALID_DATA,
        `payhost bridge: cannot ${what}: the payment's data has no ${KEYS.paymentId} (was it authorized through payhost?)`
      )
    }
    return id
  }

  /** Whether Medusa's Payment Module records a live Payment of session `medusaSessionId` for `payhostPaymentId`. */
  protected async medusaHasPayment_(medusaSessionId: string | undefined, payhostPaymentId: string): Promise<boolean> {
    if (!medusaSessionId) {
      return false
    }
    try {
      const service = (this.container as any)?.paymentService
      if (!service?.list) {
        return false
      }
      const payments = await service.list({ payment_session_id: medusaSessionId }, { select: ["id", "data", "canceled_at"] })
      return payments.some((p: any) => !p.canceled_at && p.data?.[KEYS.paymentId] === payhostPaymentId)
    } catch {
      return false
    }
  }

  /**
   * The amount of Medusa's Capture row `captureId` in minor units, when the Payment Module's
   * container lets the bridge read it (its `captureService`), else undefined. Used only to
   * refuse a partial capture the bridge could not honour.
   */
  protected async medusaCaptureAmount_(captureId: string | undefined, currency: string): Promise<number | undefined> {
    if (!captureId) {
      return undefined
    }
    try {
      const service = (this.container as any)?.captureService
      if (!service?.retrieve) {
        return undefined
      }
      const capture = await service.retrieve(captureId, { select: ["id", "amount", "raw_amount"] })
      return toMinorUnits(capture.raw_amount ?? capture.amount, currency)
    } catch {
      return undefined
    }
  }
}

/**
 * The provider's decline code and message. payhost's 402 says `code: "declined"` and puts the
 * provider's own code in the message: `declined (card_declined): <provider's message>`.
 */
export function declineOf(e: PayhostError): { code: string | null; message: string } {
  const message = e.payhost?.message ?? e.message
  const m = /^declined(?: \(([^)]*)\))?: ?(.*)$/s.exec(message)
  if (m) {
    return { code: m[1] ?? e.payhost?.code ?? null, message: m[2] || message }
  }
  return { code: e.payhost?.code ?? null, message }
}

function enc(id: string): string {
  return encodeURIComponent(id)
}

export default PayhostProviderService

/** payhost's account holder, as its routes answer. */
type PayhostAccountHolder = {
  id: string
  provider_id: string
  customer_id: string
  reference?: string | null
  data?: unknown
  status: string
}

/** A saved payment method, as payhost's routes answer. */
type PayhostPaymentMethod = {
  id: string
  account_holder_id: string
  reference?: string | null
  data?: unknown
  status: string
}

/** What Medusa keeps of a payhost account holder (ids and the provider's tokens, never a card). */
function holderData(h: PayhostAccountHolder): Json {
  return {
    [KEYS.accountHolderId]: h.id,
    payhost_account_holder_status: h.status,
    payhost_reference: h.reference ?? null,
    [KEYS.providerData]: h.data ?? null,
  }
}

function methodData(m: PayhostPaymentMethod): Json {
  return {
    [KEYS.paymentMethodId]: m.id,
    [KEYS.accountHolderId]: m.account_holder_id,
    payhost_payment_method_status: m.status,
    [KEYS.providerData]: m.data ?? null,
  }
}

/** payhost's holder id from Medusa's AccountHolder (its data, else its `external_id`). */
function holderIdOf(holder: { data?: unknown; external_id?: string } | undefined): string {
  const id = str(holder?.data, KEYS.accountHolderId) ?? holder?.external_id
  if (!id) {
    throw new MedusaError(
      MedusaError.Types.INVALID_DATA,
      `payhost bridge: the account holder carries no ${KEYS.accountHolderId} (was it created by this provider?)`
    )
  }
  return id
}

/** Medusa's customer as payhost takes it. */
function customerOf(c: Record<string, unknown>): Json {
  const out: Json = { id: c.id }
  for (const k of ["email", "first_name", "last_name", "company_name", "phone"]) {
    if (typeof c[k] === "string" && c[k]) {
      out[k] = c[k]
    }
  }
  if (c.billing_address && typeof c.billing_address === "object") {
    out.billing_address = c.billing_address
  }
  return out
}
