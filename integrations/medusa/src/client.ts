/**
 * payhost over HTTP: one request at a time, with the API key, an optional Idempotency-Key, a
 * deadline, and retries (jittered exponential backoff, as Medusa's own MedusaPaymentsProvider
 * does) of what provably did not reach payhost or is safe to send again.
 */
import { MedusaError } from "@medusajs/framework/utils"
import type { ResolvedOptions } from "./options"

/** payhost's one error shape: `{"error": {"type", "code", "message", "param"?}}`. */
export type PayhostErrorBody = {
  type: string
  code: string
  message: string
  param?: string
}

/** What kind of failure, as the bridge acts on it. */
export type FailureKind =
  | "declined" // 402: the provider declined; the session is in `error`
  | "outcome_unknown" // 409 / 504 (and a request cut after it was sent): payhost reconciles
  | "auth" // 401 / 403: the API key is wrong or lacks a scope
  | "unreachable" // nothing reached payhost (connection refused…), after the retries
  | "not_found" // 404
  | "invalid_state" // 422: the object's state does not allow it
  | "invalid_request" // 400
  | "provider_error" // 502: the processor answered with an error
  | "unavailable" // 503 (after retries) / 429
  | "other"

/**
 * A payhost failure. A MedusaError (so Medusa's HTTP layer gives it a sensible status), with
 * payhost's status, type, code and param kept for the caller.
 */
export class PayhostError extends MedusaError {
  readonly kind: FailureKind
  readonly status?: number
  readonly payhost?: PayhostErrorBody

  constructor(kind: FailureKind, message: string, status?: number, payhost?: PayhostErrorBody) {
    super(medusaType(kind), message)
    this.name = "PayhostError"
    this.kind = kind
    this.status = status
    this.payhost = payhost
  }

  /** True when money may or may not have moved: payhost settles it; never guess. */
  get outcomeUnknown(): boolean {
    return this.kind === "outcome_unknown"
  }
}

function medusaType(kind: FailureKind): string {
  switch (kind) {
    case "declined":
      return MedusaError.Types.PAYMENT_AUTHORIZATION_ERROR
    case "auth":
      return MedusaError.Types.UNAUTHORIZED
    case "not_found":
      return MedusaError.Types.NOT_FOUND
    case "invalid_state":
      return MedusaError.Types.NOT_ALLOWED
    case "invalid_request":
      return MedusaError.Types.INVALID_DATA
    case "outcome_unknown":
      return MedusaError.Types.CONFLICT
    default:
      return MedusaError.Types.UNEXPECTED_STATE
  }
}

export type RequestOptions = {
  /** Sent as `Idempotency-Key`: a retry with it replays payhost's first answer. */
  idempotencyKey?: string
  /** Query string values. */
  query?: Record<string, string>
}

/** Errors from `fetch` that say the request never reached the server. */
const NOT_SENT = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "EADDRNOTAVAIL"])

function causeCode(e: unknown): string | undefined {
  let cur: any = e
  for (let i = 0; i < 4 && cur; i++) {
    if (typeof cur.code === "string") {
      return cur.code
    }
    cur = cur.cause
  }
  return undefined
}

export type Sleep = (ms: number) => Promise<void>
const realSleep: Sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** The delay before retry `n` (1-based): base·2^(n-1), drawn in [½, 1] of that (jitter). */
export function backoffMs(base: number, n: number, random: () => number = Math.random): number {
  return base * Math.pow(2, n - 1) * (0.5 + random() * 0.5)
}

export class PayhostClient {
  constructor(
    private readonly options: ResolvedOptions,
    private readonly sleep: Sleep = realSleep,
    private readonly fetchImpl: typeof fetch = (...args) => fetch(...args)
  ) {}

  get url(): string {
    return this.options.url
  }

  async get<T>(path: string, opts: RequestOptions = {}): Promise<T> {
    return this.request<T>("GET", path, undefined, opts)
  }

  async post<T>(path: string, body: unknown, opts: RequestOptions = {}): Promise<T> {
    return this.request<T>("POST", path, body, opts)
  }

  async delete<T>(path: string, opts: RequestOptions = {}): Promise<T> {
    return this.request<T>("DELETE", path, undefined, opts)
  }

  /**
   * One request, retried while that is safe:
   * - nothing reached payhost (connection refused, DNS): always retried;
   * - cut after sending (reset, timeout) or 503/429: retried only when the request is
   *   idempotent (GET, DELETE, or carries an Idempotency-Key), since payhost replays a key;
   *   otherwise the outcome is unknown and so reported.
   */
  async request<T>(method: string, path: string, body: unknown, opts: RequestOptions = {}): Promise<T> {
    const idempotent = method === "GET" || method === "DELETE" || !!opts.idempotencyKey
    const url = new URL(this.options.url + path)
    for (const [k, v] of Object.entries(opts.query ?? {})) {
      url.searchParams.set(k, v)
    }
    const headers: Record<string, string> = {
      authorization: `Bearer ${this.options.apiKey}`,
      accept: "application/json",
    }
    if (body !== undefined) {
      headers["content-type"] = "application/json"
    }
    if (opts.idempotencyKey) {
      headers["idempotency-key"] = opts.idempotencyKey
    }
    const what = `${method} ${path}`
    let attempt = 0
    for (;;) {
      attempt += 1
      let response: Response
      try {
        response = await this.fetchImpl(url, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: AbortSignal.timeout(this.options.timeoutMs),
        })
      } catch (e) {
        const code = causeCode(e)
        const timedOut = (e as any)?.name === "TimeoutError" || (e as any)?.name === "AbortError"
        const notSent = !timedOut && code !== undefined && NOT_SENT.has(code)
        if ((notSent || idempotent) && attempt <= this.options.retries) {
          await this.sleep(backoffMs(this.options.retryBaseMs, attempt))
          continue
        }
        if (notSent) {
          throw new PayhostError(
            "unreachable",
            `payhost unreachable at ${this.options.url} (${code}) after ${attempt} tries: ${what} was not sent, nothing changed`
          )
        }
        if (timedOut) {
          throw new PayhostError(
            "outcome_unknown",
            `payhost did not answer ${what} within ${this.options.timeoutMs} ms: the outcome is unknown; ` +
              `payhost records it and reconciles it with the processor (retry later with the same request)`
          )
        }
        throw new PayhostError(
          "outcome_unknown",
          `the connection to payhost at ${this.options.url} failed during ${what} (${code ?? (e as Error)?.message}): ` +
            `the outcome is unknown and will be reconciled by payhost`
        )
      }

      const text = await response.text()
      if (response.ok) {
        try {
          return (text ? JSON.parse(text) : {}) as T
        } catch {
          throw new PayhostError(
            "outcome_unknown",
            `payhost answered ${what} with ${response.status} and a body that is not JSON: the outcome is unknown`,
            response.status
          )
        }
      }

      let err: PayhostErrorBody | undefined
      try {
        err = JSON.parse(text)?.error
      } catch {
        err = undefined
      }
      const status = response.status
      if ((status === 503 || status === 429) && idempotent && attempt <= this.options.retries) {
        const retryAfter = Number(response.headers.get("retry-after"))
        const wait = Number.isFinite(retryAfter) && retryAfter > 0
          ? Math.min(retryAfter * 1000, 5_000)
          : backoffMs(this.options.retryBaseMs, attempt)
        await this.sleep(wait)
        continue
      }
      throw errorFor(status, err, what, this.options.url)
    }
  }
}

/** The deliberate mapping of payhost's error statuses. */
export function errorFor(
  status: number,
  err: PayhostErrorBody | undefined,
  what: string,
  url: string
): PayhostError {
  const detail = err ? `${err.code}: ${err.message}${err.param ? ` (param ${err.param})` : ""}` : `HTTP ${status}`
  switch (status) {
    case 402:
      return new PayhostError("declined", `payhost: the payment was declined (${detail})`, status, err)
    case 409:
    case 504:
      return new PayhostError(
        "outcome_unknown",
        `payhost: the outcome of ${what} is unknown (${detail}); payhost will reconcile it with the ` +
          `processor and report the result as an event — do not retry as a new payment`,
        status,
        err
      )
    case 401:
      return new PayhostError(
        "auth",
        `payhost refused the API key (${detail}): check the provider's \`api_key\` option`,
        status,
        err
      )
    case 403:
      return new PayhostError(
        "auth",
        `payhost: the API key lacks a scope for ${what} (${detail}): issue it with --scope payments,read`,
        status,
        err
      )
    case 404:
      return new PayhostError("not_found", `payhost: not found (${detail}) for ${what}`, status, err)
    case 422:
      return new PayhostError("invalid_state", `payhost refused ${what} (${detail})`, status, err)
    case 400:
      return new PayhostError("invalid_request", `payhost refused ${what} as invalid (${detail})`, status, err)
    case 502:
      return new PayhostError(
        "provider_error",
        `payhost: the payment provider answered ${what} with an error (${detail})`,
        status,
        err
      )
    case 503:
    case 429:
      return new PayhostError(
        "unavailable",
        `payhost at ${url} is unavailable for ${what} (${detail}); nothing was done, retry later`,
        status,
        err
      )
    default:
      return new PayhostError("other", `payhost answered ${what} with ${status} (${detail})`, status, err)
  }
}
