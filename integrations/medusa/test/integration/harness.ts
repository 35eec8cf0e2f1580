/**
 * Integration harness: a fresh PostgreSQL database, a real `payhost serve` spawned here, a
 * webhook receiver playing Medusa's `/hooks/payment/<provider>` route + subscriber, and
 * Medusa's Payment Module booted standalone with this provider registered.
 */
import { ChildProcess, spawn } from "node:child_process"
import { createHash, randomBytes } from "node:crypto"
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import http from "node:http"
import { AddressInfo } from "node:net"
import os from "node:os"
import path from "node:path"

import { Client } from "pg"
import { MedusaApp, MedusaAppMigrateUp, MedusaModule } from "@medusajs/framework/modules-sdk"
import { ContainerRegistrationKeys, Modules, PaymentActions } from "@medusajs/framework/utils"
import type { IPaymentModuleService } from "@medusajs/framework/types"

import payhostModule from "../../src/index"

export const PACKAGE_ROOT = path.resolve(__dirname, "../../..")
export const PAYHOST_BIN = path.resolve(PACKAGE_ROOT, process.env.PAYHOST_BIN ?? "../../target/debug/payhost")
export const MEDUSA_SECRET = "whsec_medusa_bridge_test_0123456789"
export const SANDBOX_SECRET = "whsec_sandbox_test_0123"

const quiet = {
  info() {},
  warn() {},
  debug() {},
  log() {},
  activity() {
    return ""
  },
  progress() {},
  success() {},
  failure() {},
  shouldLog() {
    return false
  },
  setLogLevel() {},
  unsetLogLevel() {},
  error(...args: unknown[]) {
    if (process.env.DEBUG_MEDUSA) console.error(...args)
  },
  panic(...args: unknown[]) {
    console.error(...args)
  },
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: one fresh database per run
// ---------------------------------------------------------------------------------------------

export async function createDatabase(): Promise<{ url: string; drop: () => Promise<void> }> {
  const name = `payhost_medusa_${process.pid}_${Date.now().toString(36)}_${randomBytes(3).toString("hex")}`
  let lastError: unknown
  for (const user of [process.env.PGUSER, "postgres", "root"].filter(Boolean) as string[]) {
    const admin = new Client({ host: "127.0.0.1", port: 5432, user, database: process.env.PGDATABASE ?? "test" })
    try {
      await admin.connect()
    } catch (e) {
      lastError = e
      continue
    }
    await admin.query(`CREATE DATABASE "${name}"`)
    await admin.end()
    return {
      url: `postgres://${user}@127.0.0.1:5432/${name}`,
      drop: async () => {
        const c = new Client({ host: "127.0.0.1", port: 5432, user, database: process.env.PGDATABASE ?? "test" })
        await c.connect()
        await c.query(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`)
        await c.end()
      },
    }
  }
  throw new Error(`PostgreSQL on 127.0.0.1:5432 (users postgres/root) is not reachable: ${lastError}`)
}

// ---------------------------------------------------------------------------------------------
// payhost
// ---------------------------------------------------------------------------------------------

export type Payhost = {
  url: string
  apiKey: string
  dir: string
  stop: () => Promise<void>
  kill: () => void
  restart: () => Promise<void>
  /** Authenticated JSON request. */
  api: (method: string, p: string, body?: unknown, key?: string) => Promise<{ status: number; body: any }>
  logs: () => string
}

function config(opts: { dir: string; digest: string; listen: string; webhookUrl?: string }): string {
  const pluginDir = path.dirname(PAYHOST_BIN)
  let toml = `
[server]
listen = "${opts.listen}"

[storage]
url = "sqlite://${path.join(opts.dir, "payhost.db")}"

[log]
level = "info"

[plugins]
dir = "${pluginDir}"

[[api_keys]]
id = "medusa"
digest = "sha256:${opts.digest}"
scopes = ["payments", "read"]

[providers.system]
library = "payhost_provider_system"

[providers.sandbox]
library = "payhost_provider_sandbox"
timeout_ms = 1500

[providers.sandbox.options]
state_dir = "${path.join(opts.dir, "sandbox")}"
webhook_secret = "${SANDBOX_SECRET}"

[reconcile]
first_check_ms = 200
landing_margin_ms = 500

[events]
poll_ms = 100
`
  if (opts.webhookUrl) {
    toml += `
[[events.endpoints]]
id = "medusa_sandbox"
url = "${opts.webhookUrl}"
secret = "${MEDUSA_SECRET}"
types = ["payment_session.*", "payment.*"]
timeout_ms = 10000
retry_base_ms = 200
retry_max_ms = 2000
providers = ["sandbox"]
`
  }
  return toml
}

export async function startPayhost(opts: { webhookUrl?: string } = {}): Promise<Payhost> {
  if (!existsSync(PAYHOST_BIN)) {
    throw new Error(`payhost binary not found at ${PAYHOST_BIN} (build it, or set PAYHOST_BIN)`)
  }
  const dir = mkdtempSync(path.join(os.tmpdir(), "payhost-medusa-"))
  const apiKey = `phk_medusa_${randomBytes(24).toString("hex")}`
  const digest = createHash("sha256").update(apiKey).digest("hex")
  const cfg = path.join(dir, "payhost.toml")
  let child: ChildProcess | undefined
  let output = ""
  let url = ""
  let listen = "127.0.0.1:0"

  const boot = async (): Promise<void> => {
    {
      writeFileSync(cfg, config({ dir, digest, listen, webhookUrl: opts.webhookUrl }))
      const started = await new Promise<{ ok: boolean; out: string }>((resolve) => {
        const c = spawn(PAYHOST_BIN, ["serve", "--config", cfg], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: undefined } })
        child = c
        let out = ""
        const timer = setTimeout(() => resolve({ ok: false, out: out + "\n(timed out waiting for `listening on`)" }), 20_000)
        c.stdout!.on("data", (b: Buffer) => {
          out += b.toString()
          output += b.toString()
          const m = /listening on (http:\/\/[^\s]+)/.exec(out)
          if (m) {
            clearTimeout(timer)
            url = m[1].replace(/\/$/, "")
            resolve({ ok: true, out })
          }
        })
        c.stderr!.on("data", (b: Buffer) => {
          out += b.toString()
          output += b.toString()
        })
        c.on("exit", () => {
          clearTimeout(timer)
          resolve({ ok: false, out })
        })
      })
      if (started.ok) {
        return
      }
      throw new Error(`payhost did not start:\n${started.out}`)
    }
  }
  await boot()
  listen = url.replace("http://", "")

  const api = async (method: string, p: string, body?: unknown, key = apiKey) => {
    const r = await fetch(url + p, {
      method,
      headers: { authorization: `Bearer ${key}`, ...(body === undefined ? {} : { "content-type": "application/json" }) },
      body: body === undefined ? undefined : JSON.stringify(body),
    })
    const text = await r.text()
    return { status: r.status, body: text ? JSON.parse(text) : undefined }
  }


  const stopChild = async (signal: NodeJS.Signals) => {
    const c = child
    if (!c || c.exitCode !== null || c.signalCode !== null) return
    await new Promise<void>((resolve) => {
      c.once("exit", () => resolve())
      c.kill(signal)
    })
  }
  return {
    url,
    apiKey,
    dir,
    api,
    logs: () => output,
    kill: () => child?.kill("SIGKILL"),
    stop: async () => {
      await stopChild("SIGTERM")
      rmSync(dir, { recursive: true, force: true })
    },
    restart: async () => {
      await stopChild("SIGTERM")
      await boot()
    },
  }
}

// ---------------------------------------------------------------------------------------------
// Medusa's Payment Module, standalone
// ---------------------------------------------------------------------------------------------

export type Medusa = {
  payment: IPaymentModuleService
  shutdown: () => Promise<void>
}

export function providerOptions(payhost: { url: string; apiKey: string }, provider: string, extra: Record<string, unknown> = {}) {
  return {
    url: payhost.url,
    api_key: payhost.apiKey,
    provider,
    webhook_secret: MEDUSA_SECRET,
    timeout_ms: 10_000,
    retries: 3,
    retry_base_ms: 50,
    ...extra,
  }
}

export async function bootMedusa(
  dbUrl: string,
  providers: { id: string; options: Record<string, unknown> }[]
): Promise<Medusa> {
  const modulesConfig = {
    [Modules.PAYMENT]: {
      resolve: "@medusajs/payment",
      options: {
        providers: providers.map((p) => ({ resolve: payhostModule, id: p.id, options: p.options })),
      },
    },
  }
  // Medusa puts the knex connection it creates into injectedDependencies (and reuses it).
  const injected: Record<string, any> = { logger: quiet }
  const common = {
    modulesConfig: modulesConfig as any,
    sharedResourcesConfig: { database: { clientUrl: dbUrl } },
    injectedDependencies: injected,
  }
  const restore = silenceStderr()
  try {
    await MedusaAppMigrateUp(common)
    const app = await MedusaApp(common)
    await app.onApplicationStart()
    return {
      payment: app.modules[Modules.PAYMENT] as unknown as IPaymentModuleService,
      shutdown: async () => {
        await app.onApplicationShutdown()
        MedusaModule.clearInstances()
        await injected[ContainerRegistrationKeys.PG_CONNECTION]?.destroy?.()
      },
    }
  } finally {
    restore()
  }
}

/** Medusa prints a harmless "link-modules" not-found line while booting standalone. */
function silenceStderr(): () => void {
  const write = process.stderr.write.bind(process.stderr)
  ;(process.stderr as any).write = (chunk: any, ...rest: any[]) => {
    if (String(chunk).includes("link-modules")) return true
    return write(chunk, ...rest)
  }
  return () => {
    ;(process.stderr as any).write = write
  }
}

// ---------------------------------------------------------------------------------------------
// Medusa's webhook route + subscriber + processPaymentWorkflow, for a collection with no cart
// ---------------------------------------------------------------------------------------------

export type Delivery = {
  eventId: string
  type: string
  /** The payhost provider of the session or payment the event is about. */
  providerId?: string
  /** The payhost session the event is about. */
  payhostSessionId?: string
  result?: { action: string; data?: { session_id: string; amount: unknown } }
  error?: string
  processed: boolean
}

export type Receiver = {
  url: string
  deliveries: Delivery[]
  close: () => Promise<void>
  setPayment: (p: IPaymentModuleService) => void
  /** Resolves once `predicate` holds on the deliveries (polling), or rejects after `ms`. */
  waitFor: (predicate: (d: Delivery[]) => boolean, ms?: number) => Promise<void>
}

/**
 * Plays Medusa's side of a payhost event: `POST /hooks/payment/<provider>` answers 200 (Medusa
 * answers at once and works later: `payment.webhook_received` is emitted with a 5 s delay), then,
 * after `delayMs`, the subscriber calls `paymentModule.getWebhookActionAndData`, keeps only
 * `authorized` / `captured` results carrying a session id, and runs what
 * `processPaymentWorkflow` (@medusajs/core-flows) does for a payment collection linked to no
 * cart — which is what a standalone Payment Module has:
 * - captured, a Payment exists     -> capturePaymentWorkflow -> paymentModule.capturePayment({ payment_id, amount })
 * - captured, no Payment yet       -> authorizePaymentSession(session_id, {}) then capturePayment
 * - authorized, no cart linked     -> authorizePaymentSession(session_id, {})
 * The workflow engine itself (and its cart lock/completion steps) needs the full Medusa server.
 */
export async function startReceiver(delayMs = Number(process.env.MEDUSA_WEBHOOK_DELAY_MS ?? 1000)): Promise<Receiver> {
  let payment: IPaymentModuleService | undefined
  const deliveries: Delivery[] = []
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on("data", (c: Buffer) => chunks.push(c))
    req.on("end", () => {
      const rawBody = Buffer.concat(chunks)
      const provider = decodeURIComponent((req.url ?? "").replace(/^\/hooks\/payment\//, "").split("?")[0])
      const delivery: Delivery = {
        eventId: String(req.headers["payhost-event-id"] ?? ""),
        type: String(req.headers["payhost-event-type"] ?? ""),
        processed: false,
      }
      deliveries.push(delivery)
      res.writeHead(200, { "content-type": "application/json" })
      res.end("{}")
      let body: unknown
      try {
        body = JSON.parse(rawBody.toString())
      } catch {
        body = {}
      }
      delivery.providerId = (body as any)?.data?.provider_id
      delivery.payhostSessionId = (body as any)?.payment_session_id
      setTimeout(() => {
        process_(provider, { data: body as any, rawData: rawBody, headers: req.headers as any }, delivery).finally(() => {
          delivery.processed = true
        })
      }, delayMs)
    })
  })

  const process_ = async (provider: string, payload: any, delivery: Delivery) => {
    if (!payment) return
    try {
      const result = (await payment.getWebhookActionAndData({ provider, payload })) as any
      delivery.result = result
      if (!result?.data || ![PaymentActions.AUTHORIZED, PaymentActions.SUCCESSFUL].includes(result.action)) {
        return
      }
      const sessionId: string = result.data.session_id
      const [existing] = await payment.listPayments({ payment_session_id: sessionId } as any)
      if (result.action === PaymentActions.SUCCESSFUL) {
        let paymentId: string | undefined = existing?.id
        if (!paymentId) {
          const p = await payment.authorizePaymentSession(sessionId, {})
          paymentId = p?.id
        }
        if (paymentId) {
          await payment.capturePayment({ payment_id: paymentId, amount: result.data.amount })
        }
      } else if (!existing) {
        await payment.authorizePaymentSession(sessionId, {})
      }
    } catch (e) {
      delivery.error = (e as Error)?.message ?? String(e)
    }
  }

  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  const { port } = server.address() as AddressInfo
  return {
    url: `http://127.0.0.1:${port}/hooks/payment/payhost_sandbox`,
    deliveries,
    setPayment: (p) => {
      payment = p
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections?.()
        server.close(() => resolve())
      }),
    waitFor: async (predicate, ms = 20_000) => {
      const until = Date.now() + ms
      while (Date.now() < until) {
        if (predicate(deliveries)) return
        await new Promise((r) => setTimeout(r, 50))
      }
      throw new Error(
        `timed out waiting on webhook deliveries; seen: ${JSON.stringify(deliveries.map((d) => ({ type: d.type, action: d.result?.action, error: d.error, processed: d.processed })))}`
      )
    },
  }
}

export async function eventually<T>(fn: () => Promise<T | undefined | false>, ms = 20_000, what = "condition"): Promise<T> {
  const until = Date.now() + ms
  let last: unknown
  while (Date.now() < until) {
    try {
      const v = await fn()
      if (v) return v
    } catch (e) {
      last = e
    }
    await new Promise((r) => setTimeout(r, 100))
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last}` : ""}`)
}
