/** The provider's options (`providers: [{ resolve, id, options }]` in medusa-config). */

export type PayhostOptions = {
  /** payhost's base URL, e.g. `http://127.0.0.1:8080` (no path beyond a prefix, no query). */
  url: string
  /** An API key from `payhost keys new --scope payments,read`: `phk_<id>_<secret>`. */
  api_key: string
  /** The payhost provider id this Medusa provider drives (`[providers.<id>]`), e.g. `sandbox`. */
  provider: string
  /**
   * The secret of the `[[events.endpoints]]` entry that posts to this provider's Medusa webhook
   * route. A list during a rotation: an event signed with any of them is accepted.
   */
  webhook_secret?: string | string[]
  /** One HTTP request's deadline (default 30000). Past it the outcome is unknown. */
  timeout_ms?: number
  /** Retries of a request that did not reach payhost (connection refused…) (default 3). */
  retries?: number
  /** First retry's delay; doubling, each drawn in [½, 1] of its step (default 200). */
  retry_base_ms?: number
  /** How far a webhook's timestamp may be from now (default 300). */
  webhook_tolerance_s?: number
}

export type ResolvedOptions = {
  url: string
  apiKey: string
  provider: string
  webhookSecrets: string[]
  timeoutMs: number
  retries: number
  retryBaseMs: number
  webhookToleranceS: number
}

export class OptionsError extends Error {
  constructor(message: string) {
    super(`medusa-payment-payhost: ${message}`)
    this.name = "OptionsError"
  }
}

const KNOWN = new Set([
  "url",
  "api_key",
  "provider",
  "webhook_secret",
  "timeout_ms",
  "retries",
  "retry_base_ms",
  "webhook_tolerance_s",
])

function positiveInt(
  options: Record<string, unknown>,
  key: string,
  fallback: number,
  min: number,
  max: number
): number {
  const v = options[key]
  if (v === undefined || v === null) {
    return fallback
  }
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
    throw new OptionsError(`option \`${key}\` must be an integer from ${min} to ${max}, got ${JSON.stringify(v)}`)
  }
  return v
}

/** Checks the options and fills defaults; every error names the option and what is wanted. */
export function resolveOptions(raw: unknown): ResolvedOptions {
  if (!raw || typeof raw !== "object" || Array.isArray(raw)) {
    throw new OptionsError("options must be an object with url, api_key and provider")
  }
  const options = raw as Record<string, unknown>
  for (const key of Object.keys(options)) {
    if (!KNOWN.has(key)) {
      throw new OptionsError(
        `unknown option \`${key}\` (known: ${[...KNOWN].join(", ")})`
      )
    }
  }

  const url = options.url
  if (typeof url !== "string" || !url) {
    throw new OptionsError("option `url` is required: payhost's base URL, e.g. http://127.0.0.1:8080")
  }
  let parsed: URL
  try {
    parsed = new URL(url)
  } catch {
    throw new OptionsError(`option \`url\` is not a URL: ${JSON.stringify(url)}`)
  }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") {
    throw new OptionsError(`option \`url\` must be http:// or https://, got ${parsed.protocol}`)
  }
  if (parsed.username || parsed.password) {
    throw new OptionsError("option `url` must not carry credentials: put the key in `api_key`")
  }
  if (parsed.search || parsed.hash) {
    throw new OptionsError("option `url` must not have a query or fragment (payhost refuses keys in URLs)")
  }

  const apiKey = options.api_key
  if (typeof apiKey !== "string" || !apiKey) {
    throw new OptionsError(
      "option `api_key` is required: a key from `payhost keys new --scope payments,read --id medusa` (phk_…)"
    )
  }
  if (!/^phk_[A-Za-z0-9_-]+$/.test(apiKey)) {
    throw new OptionsError("option `api_key` must be a payhost API key (phk_<id>_<secret>)")
  }

  const provider = options.provider
  if (typeof provider !== "string" || !/^[a-z0-9_-]+$/.test(provider)) {
    throw new OptionsError(
      "option `provider` is required: the payhost provider id ([providers.<id>] in payhost's config, [a-z0-9_-]+), e.g. \"sandbox\""
    )
  }

  const secret = options.webhook_secret
  let webhookSecrets: string[] = []
  if (secret !== undefined && secret !== null) {
    const list = Array.isArray(secret) ? secret : [secret]
    if (list.length === 0) {
      throw new OptionsError("option `webhook_secret` must not be an empty list")
    }
    for (const s of list) {
      if (typeof s !== "string" || s.length < 16) {
        throw new OptionsError(
          "option `webhook_secret` must be the [[events.endpoints]] secret (a string of at least 16 characters), or a list of them during a rotation"
        )
      }
    }
    webhookSecrets = list as string[]
  }

  return {
    url: url.replace(/\/+$/, ""),
    apiKey,
    provider,
    webhookSecrets,
    timeoutMs: positiveInt(options, "timeout_ms", 30_000, 100, 600_000),
    retries: positiveInt(options, "retries", 3, 0, 10),
    retryBaseMs: positiveInt(options, "retry_base_ms", 200, 1, 60_000),
    webhookToleranceS: positiveInt(options, "webhook_tolerance_s", 300, 1, 86_400),
  }
}
